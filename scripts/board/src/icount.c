/*
 * icount.c: a QEMU TCG plugin (qemu-user 7.2, plugin API v1) that counts the guest instructions
 * executed, split by the ELF file they were fetched from (model.so, libtvm_runtime.so, libc, ...).
 *
 *   qemu-aarch64 -cpu cortex-a72 -plugin libicount.so,out=counts.json,match=/model.so ./prog
 *
 * Counting is inline (a counter add per executed translation block, no callbacks), so it is cheap and
 * exact for a single guest thread. The adds are not atomic across guest threads: count with
 * TVM_NUM_THREADS=1. A translation block that exits early is still counted in full, which does not
 * happen inside straight-line kernel code but makes whole-process totals drift by a few instructions.
 *
 * Attribution: at translation time the block's host address (qemu-user maps guest memory 1:1 into its
 * own address space) is looked up in /proc/self/maps; a miss re-reads the maps, since dlopen() adds files.
 * No glib: only qemu-plugin.h is needed.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

enum { MAX_FILES = 256, MAX_RANGES = 4096, UNKNOWN = MAX_FILES };

struct range {
    uintptr_t lo, hi;
    int file;
};

static uint64_t insns_total;
static uint64_t insns_per_file[MAX_FILES + 1];  /* [UNKNOWN]: anonymous memory (JIT, vdso) */
static char *file_name[MAX_FILES];
static int n_files;
static struct range ranges[MAX_RANGES];
static int n_ranges;
static const char *out_path;
static const char *match;

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
        ranges[n_ranges++] = (struct range){lo, hi, intern_file(p)};
    }
    fclose(f);
}

static int file_of(uintptr_t addr)
{
    for (int i = 0; i < n_ranges; i++) {
        if (addr >= ranges[i].lo && addr < ranges[i].hi) {
            return ranges[i].file;
        }
    }
    return -1;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    uintptr_t addr = (uintptr_t)qemu_plugin_insn_haddr(qemu_plugin_tb_get_insn(tb, 0));
    int file = file_of(addr);

    if (file < 0) {
        read_maps();
        file = file_of(addr);
    }
    if (file < 0) {
        file = UNKNOWN;
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns_total, n);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns_per_file[file], n);
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

static void at_exit_report(qemu_plugin_id_t id, void *data)
{
    FILE *o = out_path ? fopen(out_path, "w") : NULL;
    uint64_t matched = 0;
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
        fprintf(o, ", \"matched_insns\": %" PRIu64, matched);
    }
    fprintf(o, "}\n");
    if (o != stderr) {
        fclose(o);
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
        } else {
            fprintf(stderr, "icount: unknown option '%s' (expected out=FILE, match=SUBSTRING)\n", argv[i]);
            return -1;
        }
    }
    read_maps();
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, at_exit_report, NULL);
    return 0;
}
