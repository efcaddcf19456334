/*
 * isa_check.c: what the emulated CPU offers. Prints the kernel's AT_HWCAP feature names, then runs one
 * ARMv8.2 SDOT (the int8 dot product that "+dotprod" targets use). A Raspberry Pi 4 (Cortex-A72,
 * ARMv8.0) has no SDOT and raises SIGILL, so `-cpu cortex-a72` must too; `-cpu cortex-a76` (Pi 5) runs it.
 * Exit status: 0 if SDOT ran, 1 if it raised SIGILL.
 */
#include <arm_neon.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/auxv.h>

static sigjmp_buf on_sigill_jump;

static void on_sigill(int sig)
{
    (void)sig;
    siglongjmp(on_sigill_jump, 1);
}

__attribute__((target("arch=armv8.2-a+dotprod"), noinline)) static int sdot_lane0(void)
{
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vdupq_n_s8(2), vdupq_n_s8(3));
    return vgetq_lane_s32(acc, 0);  /* 4 * 2 * 3 = 24 */
}

int main(void)
{
    static const struct { const char *name; unsigned long bit; } features[] = {
        {"fp", 1UL << 0},      {"asimd", 1UL << 1},   {"aes", 1UL << 3},     {"pmull", 1UL << 4},
        {"sha1", 1UL << 5},    {"sha2", 1UL << 6},    {"crc32", 1UL << 7},   {"atomics", 1UL << 8},
        {"fphp", 1UL << 9},    {"asimdhp", 1UL << 10}, {"asimddp", 1UL << 20}, {"sve", 1UL << 22},
    };
    unsigned long hwcap = getauxval(AT_HWCAP);

    printf("hwcap:");
    for (unsigned i = 0; i < sizeof(features) / sizeof(features[0]); i++) {
        if (hwcap & features[i].bit) {
            printf(" %s", features[i].name);
        }
    }
    printf("\n");
    signal(SIGILL, on_sigill);
    if (sigsetjmp(on_sigill_jump, 1) == 0) {
        printf("sdot: ok (%d)\n", sdot_lane0());
        return 0;
    }
    printf("sdot: SIGILL\n");
    return 1;
}
