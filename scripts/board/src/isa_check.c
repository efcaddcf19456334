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
    /* the kernel's names for the AT_HWCAP bits (arch/arm64/include/uapi/asm/hwcap.h), in bit order */
    static const char *const features[32] = {
        "fp",     "asimd",   "evtstrm", "aes",     "pmull",   "sha1",  "sha2",   "crc32",
        "atomics", "fphp",   "asimdhp", "cpuid",   "asimdrdm", "jscvt", "fcma",   "lrcpc",
        "dcpop",  "sha3",    "sm3",     "sm4",     "asimddp", "sha512", "sve",    "asimdfhm",
        "dit",    "uscat",   "ilrcpc",  "flagm",   "ssbs",    "sb",    "paca",   "pacg",
    };
    unsigned long hwcap = getauxval(AT_HWCAP);

    printf("hwcap:");
    for (unsigned i = 0; i < 32; i++) {
        if (hwcap & (1UL << i)) {
            printf(" %s", features[i]);
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
