/* The tar format the agent reads and writes (tar.c): POSIX ustar blocks with pax extended
 * headers ('x') for long names, long link targets, big sizes and big ids; it also reads
 * GNU long names ('L', 'K') and base-256 numbers, which Python's tarfile and GNU tar
 * write. */
#ifndef BANGER_TAR_H
#define BANGER_TAR_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BLOCK 512
#define PATH_CAP 4096            /* longest entry name or link target, in bytes */

struct tar_entry {
    char name[PATH_CAP + 1];
    char link[PATH_CAP + 1];
    char type;                   /* '0' file, '1' hard link, '2' symlink, '5' dir, ... */
    uint32_t mode;
    int64_t size, mtime, uid, gid;
};

/* A header block -> its numbers (overrides come from pax/GNU headers before it).
 * 0: ok; 1: an all-zero block; -1: a bad checksum or number (*why says which). */
int tar_parse_header(const unsigned char *h, struct tar_entry *e, const char **why);

/* Apply a pax extended header's records (path, linkpath, size, mtime, uid, gid) to
 * *e and mark what they set in *set (bits: 1 path, 2 linkpath, 4 size, 8 mtime, 16 uid,
 * 32 gid). false: a malformed record. */
bool tar_parse_pax(const char *data, size_t n, struct tar_entry *e, int *set);

/* The header blocks of an entry (a pax header first if it needs one) into buf (room for
 * TAR_HEADER_CAP bytes); the number of bytes written. */
#define TAR_HEADER_CAP (3 * BLOCK + 3 * PATH_CAP)
size_t tar_write_header(unsigned char *buf, const struct tar_entry *e);
#endif
