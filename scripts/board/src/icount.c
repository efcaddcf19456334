/*
 * icount.c: a QEMU TCG plugin (qemu-user 7.2, plugin API v1) that counts the guest instructions
 * executed, split by the ELF file they were fetched from (model.so, libtvm_runtime.so, libc, ...),
 * and by instruction class for the files that match.
 *
 *   qemu-aarch64 -cpu cortex-a72 -plugin libicount.so,out=counts.json,match=/model.so[,blocks=blocks.txt] ./prog
 *
 * Counting is inline (counter adds per executed translation block, no callbacks), so it is cheap and
 * exact for a single guest thread. The adds are not atomic across guest threads: count with
 * TVM_NUM_THREADS=1. A translation block that exits early is still counted in full, which does not
 * happen inside straight-line kernel code but makes whole-process totals drift by a few instructions.
 *
 * Attribution: at translation time the block's host address (qemu-user maps guest memory 1:1 into its
 * own address space) is looked up in /proc/self/maps; a miss re-reads the maps, since dlopen() adds files.
 *
 * Classes (aarch64 encodings, decoded from the instruction word; see class_of):
 *   dot           SDOT/UDOT/USDOT/SUDOT (vector and by element), SMMLA/UMMLA/USMMLA
 *   widening_mul  Advanced SIMD widening multiplies: [SU]MULL, [SU]MLAL, [SU]MLSL, SQDMULL/SQDMLAL/SQDMLSL, PMULL
 *                 (vector and by element, both halves)
 *   load_store    every load and store (integer, SIMD/FP, pairs, exclusives)
 *   simd_other    every other Advanced SIMD instruction (vector and SIMD scalar), crypto
 *   scalar_float  scalar floating point: FADD/FMUL/FMADD/FCVT/SCVTF/FMOV/FCMP ... on S/D/H registers
 *   other         integer data processing, branches, system
 *
 * blocks=FILE writes one line per translated block inside the matched files that executed at least once:
 *   <file offset, hex> <executions> <instruction words, hex...>
 * so that a cost model can weigh each block (tvm_lowbit.cost). No glib: only qemu-plugin.h is needed.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

enum { MAX_FILES = 256, MAX_RANGES = 4096, UNKNOWN = MAX_FILES };
enum { DOT, WIDENING_MUL, LOAD_STORE, SIMD_OTHER, SCALAR_FLOAT, OTHER, N_CLASSES };
static const char *class_name[N_CLASSES] = {"dot", "widening_mul", "load_store", "simd_other", "scalar_float",
                                            "other"};

struct range {
    uintptr_t lo, hi, offset;
    int file;
};

struct block {
    uint64_t executions;  /* the inline add target: first member, never moved */
    uint64_t file_offset;
    uint32_t n;
    uint32_t words[];
};

static uint64_t insns_total;
static uint64_t insns_per_file[MAX_FILES + 1];  /* [UNKNOWN]: anonymous memory (JIT, vdso) */
static uint64_t classes_per_file[MAX_FILES + 1][N_CLASSES];
static char *file_name[MAX_FILES];
static int n_files;
static struct range ranges[MAX_RANGES];
static int n_ranges;
static const char *out_path;
static const char *match;
static const char *blocks_path;
static struct block **blocks;
static size_t n_blocks, cap_blocks;

static int intern_file(const char *path)
{
    for (int i = 0; i < n_files; i++) {
        if (strcmp(file_name[i], path) == 0) {
            return i;
        }
    }
    if (n_files == MAX_FILES) {
        return UNKNOWN;
    }
    file_name[n_files] = strdup(path);
    return n_files++;
}

static void read_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4352], path[4096];
    unsigned long lo, hi, offset, inode;
    char perms[8], dev[16];

    n_ranges = 0;
    if (f == NULL) {
        return;
    }
    while (n_ranges < MAX_RANGES && fgets(line, sizeof(line), f)) {
        path[0] = '\0';
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %4095[^\n]", &lo, &hi, perms, &offset, dev, &inode,
                   path) < 7) {
            continue;  /* anonymous mapping */
        }
        const char *p = path + strspn(path, " ");
        if (*p == '\0' || *p == '[') {
            continue;  /* [heap], [stack], [vdso] */
        }
        ranges[n_ranges++] = (struct range){lo, hi, offset, intern_file(p)};
    }
    fclose(f);
}

static const struct range *range_of(uintptr_t addr)
{
    for (int i = 0; i < n_ranges; i++) {
        if (addr >= ranges[i].lo && addr < ranges[i].hi) {
            return &ranges[i];
        }
    }
    return NULL;
}

/* The class of one A64 instruction word (Arm ARM, "A64 instruction set encoding"). */
static int class_of(uint32_t w)
{
    if ((w & 0x0a000000) == 0x08000000) {
        return LOAD_STORE;  /* op0 = x1x0 */
    }
    if ((w & 0x0e000000) != 0x0e000000) {
        return OTHER;  /* not "data processing: scalar FP and Advanced SIMD" (op0 = x111) */
    }
    if ((w & 0x5e000000) == 0x1e000000) {
        return SCALAR_FLOAT;  /* M 0 S 1111x: FP data processing, FP <-> integer conversions */
    }
    /* Advanced SIMD */
    if ((w & 0x9f20fc00) == 0x0e009400 || (w & 0xbfe0fc00) == 0x0e809c00) {
        return DOT;  /* [SU]DOT (vector): 0 Q U 01110 10 0 Rm 100101; USDOT (vector): 0 Q 0 01110 100 Rm 100111 */
    }
    if ((w & 0x9f00f400) == 0x0f00e000 || (w & 0xbf00f400) == 0x0f00f000) {
        return DOT;  /* [SU]DOT (by element): 0 Q U 01111 10 L M Rm 1110 H 0; SUDOT/USDOT/BFDOT: 0 Q 0 01111 size L M Rm 1111 H 0 */
    }
    if ((w & 0x9fe0fc00) == 0x0e80a400 || (w & 0xbfe0fc00) == 0x0e80ac00) {
        return DOT;  /* SMMLA / UMMLA / USMMLA: 0 1 U 01110 100 Rm 1010x1 */
    }
    if ((w & 0x9f200c00) == 0x0e200000) {
        uint32_t op = (w >> 12) & 0xf;  /* "three different": 0 Q U 01110 size 1 Rm opcode 00 */
        if (op >= 8 && op <= 14) {
            return WIDENING_MUL;  /* [SU]MLAL SQDMLAL [SU]MLSL SQDMLSL [SU]MULL SQDMULL PMULL */
        }
    }
    if ((w & 0x9f000400) == 0x0f000000) {
        uint32_t op = (w >> 12) & 0xf;  /* by element: 0 Q U 01111 size L M Rm opcode H 0 */
        if (op == 2 || op == 3 || op == 6 || op == 7 || op == 10 || op == 11) {
            return WIDENING_MUL;
        }
    }
    return SIMD_OTHER;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    uintptr_t addr = (uintptr_t)qemu_plugin_insn_haddr(qemu_plugin_tb_get_insn(tb, 0));
    const struct range *r = range_of(addr);
    uint64_t per_class[N_CLASSES] = {0};
    struct block *b = NULL;

    if (r == NULL) {
        read_maps();
        r = range_of(addr);
    }
    int file = r ? r->file : UNKNOWN;
    if (blocks_path && file != UNKNOWN && strstr(file_name[file], match)) {
        b = calloc(1, sizeof(*b) + n * sizeof(uint32_t));
        if (b != NULL) {
            b->file_offset = addr - r->lo + r->offset;
            b->n = (uint32_t)n;
            if (n_blocks == cap_blocks) {
                size_t cap = cap_blocks ? 2 * cap_blocks : 4096;
                struct block **grown = realloc(blocks, cap * sizeof(*grown));
                if (grown == NULL) {
                    free(b);
                    b = NULL;
                } else {
                    blocks = grown;
                    cap_blocks = cap;
                }
            }
            if (b != NULL) {
                blocks[n_blocks++] = b;
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t w = 0;
        if (qemu_plugin_insn_size(insn) == 4) {
            memcpy(&w, qemu_plugin_insn_data(insn), 4);
        }
        per_class[class_of(w)]++;
        if (b != NULL) {
            b->words[i] = w;
        }
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns_total, n);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns_per_file[file], n);
    for (int c = 0; c < N_CLASSES; c++) {
        if (per_class[c]) {
            qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &classes_per_file[file][c],
                                                     per_class[c]);
        }
    }
    if (b != NULL) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->executions, 1);
    }
}

static void write_json_string(FILE *o, const char *s)
{
    fputc('"', o);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') {
            fputc('\\', o);
        }
        fputc(*s, o);
    }
    fputc('"', o);
}

static void write_blocks(void)
{
    FILE *o = fopen(blocks_path, "w");
    if (o == NULL) {
        fprintf(stderr, "icount: cannot write %s\n", blocks_path);
        return;
    }
    for (size_t i = 0; i < n_blocks; i++) {
        const struct block *b = blocks[i];
        if (b->executions == 0) {
            continue;
        }
        fprintf(o, "%" PRIx64 " %" PRIu64, b->file_offset, b->executions);
        for (uint32_t k = 0; k < b->n; k++) {
            fprintf(o, " %08" PRIx32, b->words[k]);
        }
        fputc('\n', o);
    }
    fclose(o);
}

static void at_exit_report(qemu_plugin_id_t id, void *data)
{
    FILE *o = out_path ? fopen(out_path, "w") : NULL;
    uint64_t matched = 0, matched_classes[N_CLASSES] = {0};
    const char *sep = "";

    if (o == NULL) {
        o = stderr;
    }
    fprintf(o, "{\"total_insns\": %" PRIu64 ", \"unattributed_insns\": %" PRIu64 ", \"per_file\": {",
            insns_total, insns_per_file[UNKNOWN]);
    for (int i = 0; i < n_files; i++) {
        if (insns_per_file[i] == 0) {
            continue;
        }
        if (match && strstr(file_name[i], match)) {
            matched += insns_per_file[i];
            for (int c = 0; c < N_CLASSES; c++) {
                matched_classes[c] += classes_per_file[i][c];
            }
        }
        fprintf(o, "%s\n  ", sep);
        write_json_string(o, file_name[i]);
        fprintf(o, ": %" PRIu64, insns_per_file[i]);
        sep = ",";
    }
    fprintf(o, "}");
    if (match) {
        fprintf(o, ", \"match\": ");
        write_json_string(o, match);
        fprintf(o, ", \"matched_insns\": %" PRIu64 ", \"matched_classes\": {", matched);
        for (int c = 0; c < N_CLASSES; c++) {
            fprintf(o, "%s\"%s\": %" PRIu64, c ? ", " : "", class_name[c], matched_classes[c]);
        }
        fprintf(o, "}");
    }
    fprintf(o, "}\n");
    if (o != stderr) {
        fclose(o);
    }
    if (blocks_path) {
        write_blocks();
    }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                           char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = strdup(argv[i] + 4);
        } else if (strncmp(argv[i], "match=", 6) == 0) {
            match = strdup(argv[i] + 6);
        } else if (strncmp(argv[i], "blocks=", 7) == 0) {
            blocks_path = strdup(argv[i] + 7);
        } else {
            fprintf(stderr, "icount: unknown option '%s' (expected out=FILE, match=SUBSTRING, blocks=FILE)\n",
                    argv[i]);
            return -1;
        }
    }
    if (blocks_path && !match) {
        fprintf(stderr, "icount: blocks=FILE needs match=SUBSTRING (the library whose blocks to record)\n");
        return -1;
    }
    read_maps();
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, at_exit_report, NULL);
    return 0;
}
