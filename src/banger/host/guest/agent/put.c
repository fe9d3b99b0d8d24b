/* FILE_PUT (docs/agent-protocol.md, "Files"): the host's tar extracted into a directory
 * as its DATA frames arrive. The tar is hostile input: no entry lands outside the
 * destination (absolute names and ".." are refused, and each parent directory is opened
 * one component at a time with O_NOFOLLOW, so a symlink in the tree is never followed),
 * no device node or fifo is made, and a file is written under a temporary name and
 * renamed into place once whole. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "files.h"
#include "tar.h"

#define PUT_WINDOW (1 << 20)     /* DATA a put may have in flight (written at once) */
#define PAX_CAP (64 << 10)       /* an extended header's records, at most */
#define MAX_DEFERRED 65536       /* directories whose mode and mtime are set at the end */

struct dirmeta { char *name; uint32_t mode; int64_t mtime, uid, gid; };

struct put {
    int root;                    /* the destination directory */
    unsigned char hdr[BLOCK];
    size_t hlen;
    int zeros;                   /* all-zero blocks in a row: two end the archive */
    struct tar_entry e;          /* the entry being read */
    int set;                     /* what pax/GNU headers set for the next entry */
    struct tar_entry next;       /* their values */
    char ext;                    /* reading an extension's data: 'x', 'g', 'L', 'K' */
    char *ext_buf;
    size_t ext_len;
    int64_t left;                /* data bytes of the current entry still to come */
    size_t pad;                  /* padding after them */
    int fd, parent;              /* the file being written, its directory */
    char tmp[64];
    struct dirmeta *dirs;
    size_t ndirs;
};
void put_end(struct put *p) {
    if (p->fd >= 0) {
        close(p->fd);
        unlinkat(p->parent, p->tmp, 0);   /* no half file under its final name */
    }
    if (p->parent >= 0 && p->parent != p->root)
        close(p->parent);
    close_fd(&p->root);
    for (size_t i = 0; i < p->ndirs; i++)
        free(p->dirs[i].name);
    free(p->dirs);
    free(p->ext_buf);
    free(p);
}

/* mkdir -p: the destination may be new (like `docker cp` to a new name). */
static int open_dest(const char *dest) {
    char buf[PATH_CAP + 1];
    snprintf(buf, sizeof buf, "%s", dest);
    for (char *s = buf + 1; *s; s++)
        if (*s == '/') {
            *s = 0;
            mkdir(buf, 0755);
            *s = '/';
        }
    mkdir(buf, 0755);
    return open(buf, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

void file_put(uint32_t chan, const unsigned char *b, size_t n) {
    char dest[PATH_CAP + 1];
    if (!path_field(chan, b, n, "FILE_PUT", dest))
        return;
    struct xfer *x = xfer_slot(chan);
    if (!x)
        return;
    struct put *p = calloc(1, sizeof *p);
    if (!p) {
        send_error(ERROR, chan, "out of memory");
        *x = (struct xfer){.used = false};
        return;
    }
    p->fd = p->parent = -1;
    if ((p->root = open_dest(dest)) < 0) {
        send_error(ERROR, chan, "%s: %s", dest, strerror(errno));
        free(p);
        *x = (struct xfer){.used = false};
        return;
    }
    x->p = p;
    send_credit(chan, PUT_WINDOW);
}

/* An entry's name: relative, no "..", no empty or overlong component; "./" stripped.
 * NULL if fine, else why not. */
static const char *bad_name(char *name) {
    while (name[0] == '.' && name[1] == '/')
        memmove(name, name + 2, strlen(name + 2) + 1);
    size_t len = strlen(name);
    while (len > 1 && name[len - 1] == '/')
        name[--len] = 0;
    if (name[0] == '/')
        return "an absolute name";
    for (char *c = name; *c;) {
        size_t clen = strcspn(c, "/");
        if (clen == 2 && c[0] == '.' && c[1] == '.')
            return "a '..' component";
        if (clen > 255)
            return "a component over 255 bytes";
        c += clen;
        c += *c == '/';
    }
    return NULL;
}

/* Open the directory holding `name` under root, one component at a time, never
 * following a symlink; missing ones are made (0755). *last: the final component. */
static int open_parent(int root, char *name, char **last, const char **why) {
    int fd = root;
    char *c = name, *slash;
    while ((slash = strchr(c, '/'))) {
        *slash = 0;
        if (slash != c && strcmp(c, ".")) {
            int next = openat(fd, c, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (next < 0 && errno == ENOENT && mkdirat(fd, c, 0755) == 0)
                next = openat(fd, c, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (next < 0) {
                *why = errno == ELOOP || errno == ENOTDIR
                           ? "a parent is a symlink or not a directory (not followed)"
                           : strerror(errno);
                *slash = '/';
                if (fd != root)
                    close(fd);
                return -1;
            }
            if (fd != root)
                close(fd);
            fd = next;
        }
        *slash = '/';
        c = slash + 1;
    }
    *last = c;
    return fd;
}

static void set_owner_times(int dirfd, const char *name, const struct tar_entry *e) {
    if (geteuid() == 0 && fchownat(dirfd, name, (uid_t)e->uid, (gid_t)e->gid,
                                   AT_SYMLINK_NOFOLLOW) < 0) {}
    struct timespec ts[2] = {{e->mtime, 0}, {e->mtime, 0}};
    utimensat(dirfd, name, ts, AT_SYMLINK_NOFOLLOW);
}

/* Start an entry whose header was read: NULL, or why it is refused. */
static const char *start_entry(struct put *p) {
    static char why[300];
    struct tar_entry *e = &p->e;
    const char *bad;
    char *last;
    if ((bad = bad_name(e->name)))
        return snprintf(why, sizeof why, "%s", bad), why;
    if (!e->name[0] || !strcmp(e->name, "."))
        return NULL;             /* the destination itself */
    if (e->type == '3' || e->type == '4' || e->type == '6')
        return "a device node or fifo (refused)";
    if (e->type != '0' && e->type != 0 && e->type != '7' && e->type != '5' &&
        e->type != '2' && e->type != '1')
        return snprintf(why, sizeof why, "an unsupported entry type '%c'", e->type), why;
    const char *perr = NULL;
    int parent = open_parent(p->root, e->name, &last, &perr);
    if (parent < 0)
        return perr;
    p->parent = parent;
    int r = 0;
    struct stat st;
    if (e->type == '5') {
        if (mkdirat(parent, last, 0700) < 0 &&
            !(errno == EEXIST && fstatat(parent, last, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
              S_ISDIR(st.st_mode)))
            return errno == EEXIST ? "it exists and is not a directory" : strerror(errno);
        if (p->ndirs < MAX_DEFERRED) {
            if (p->ndirs % 256 == 0) {
                struct dirmeta *d = realloc(p->dirs, (p->ndirs + 256) * sizeof *d);
                if (!d)
                    return "out of memory";
                p->dirs = d;
            }
            char *copy = strdup(e->name);
            if (!copy)
                return "out of memory";
            p->dirs[p->ndirs++] = (struct dirmeta){copy, e->mode, e->mtime, e->uid, e->gid};
        }
    } else {
        char target[PATH_CAP + 1], *tlast = NULL;
        int tdir = -1;
        if (e->type == '1') {
            snprintf(target, sizeof target, "%s", e->link);
            if ((bad = bad_name(target)) || !target[0])
                return snprintf(why, sizeof why, "a hard link to %s", bad ? bad : "nothing"),
                       why;
            if ((tdir = open_parent(p->root, target, &tlast, &perr)) < 0)
                return perr;
        }
        /* A temporary name nobody uses: an agent killed part way (a VM killed during a
         * put) left its own, and the agent's pid is the same at every boot. */
        static unsigned counter;
        for (int tries = 0;; tries++) {
            snprintf(p->tmp, sizeof p->tmp, ".banger-put.%d.%u", (int)getpid(), counter++);
            if (e->type == '2') {
                r = symlinkat(e->link, parent, p->tmp);
            } else if (e->type == '1') {
                r = linkat(tdir, tlast, parent, p->tmp, 0);
            } else {
                p->fd = openat(parent, p->tmp,
                               O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
                r = p->fd < 0 ? -1 : 0;
            }
            if (r == 0 || errno != EEXIST || tries >= 1000)
                break;
        }
        int err = errno;
        if (tdir >= 0 && tdir != p->root)
            close(tdir);
        errno = err;
    }
    if (r < 0)
        return strerror(errno);
    if (e->type == '2' || e->type == '1') {
        if (e->type == '2')
            set_owner_times(parent, p->tmp, e);
        if (renameat(parent, p->tmp, parent, last) < 0) {
            int err = errno;
            unlinkat(parent, p->tmp, 0);
            return strerror(err);
        }
    }
    return NULL;
}

/* The current file is whole: its metadata, then its final name. */
static const char *finish_file(struct put *p) {
    struct tar_entry *e = &p->e;
    char *last = strrchr(e->name, '/');
    last = last ? last + 1 : e->name;
    if (geteuid() == 0 && fchown(p->fd, (uid_t)e->uid, (gid_t)e->gid) < 0) {}
    fchmod(p->fd, e->mode & 07777);
    struct timespec ts[2] = {{e->mtime, 0}, {e->mtime, 0}};
    futimens(p->fd, ts);
    int err = close(p->fd) < 0 ? errno : 0;
    p->fd = -1;
    if (!err && renameat(p->parent, p->tmp, p->parent, last) < 0)
        err = errno;
    if (err)
        unlinkat(p->parent, p->tmp, 0);
    return err ? strerror(err) : NULL;
}

static void close_parent(struct put *p) {
    if (p->parent >= 0 && p->parent != p->root)
        close(p->parent);
    p->parent = -1;
}

/* A header block is in p->hdr: start what it describes. */
static const char *on_header(struct put *p) {
    const char *why = NULL;
    struct tar_entry e = {0};
    p->e.name[0] = 0;            /* an error now is the stream's, not the last entry's */
    int r = tar_parse_header(p->hdr, &e, &why);
    if (r < 0)
        return why;
    if (r == 1) {
        p->zeros++;
        return NULL;
    }
    p->zeros = 0;
    if (e.size < 0 || e.size > (1LL << 50))
        return "a size over 2^50 bytes";
    if (e.type == 'x' || e.type == 'g' || e.type == 'L' || e.type == 'K') {
        if (e.size > PAX_CAP)
            return "an extended header over 64 KiB";
        p->ext = e.type;
        p->ext_buf = malloc((size_t)e.size + 1);
        if (!p->ext_buf)
            return "out of memory";
        p->ext_len = 0;
        p->left = e.size;
        p->pad = (size_t)((BLOCK - e.size % BLOCK) % BLOCK);
        return NULL;
    }
    if (p->set & 1)
        memcpy(e.name, p->next.name, sizeof e.name);
    if (p->set & 2)
        memcpy(e.link, p->next.link, sizeof e.link);
    if (p->set & 4)
        e.size = p->next.size;
    if (p->set & 8)
        e.mtime = p->next.mtime;
    if (p->set & 16)
        e.uid = p->next.uid;
    if (p->set & 32)
        e.gid = p->next.gid;
    p->set = 0;
    p->e = e;
    p->left = e.size;            /* a link's or directory's data, if any, is skipped */
    p->pad = (size_t)((BLOCK - e.size % BLOCK) % BLOCK);
    const char *err = start_entry(p);
    if (!err && p->fd < 0)
        close_parent(p);
    return err;
}

static const char *on_ext_done(struct put *p) {
    char type = p->ext;
    p->ext = 0;
    p->ext_buf[p->ext_len] = 0;
    if (type == 'x' && !tar_parse_pax(p->ext_buf, p->ext_len, &p->next, &p->set))
        return "a malformed pax extended header";
    if (type == 'L' || type == 'K') {
        size_t len = strnlen(p->ext_buf, p->ext_len);
        if (len > PATH_CAP)
            return "a GNU long name over 4096 bytes";
        memcpy(type == 'L' ? p->next.name : p->next.link, p->ext_buf, len);
        (type == 'L' ? p->next.name : p->next.link)[len] = 0;
        p->set |= type == 'L' ? 1 : 2;
    }
    free(p->ext_buf);
    p->ext_buf = NULL;
    return NULL;
}

/* Feed tar bytes; NULL, or why the archive is refused. */
static const char *put_feed(struct put *p, const unsigned char *b, size_t n) {
    while (n > 0) {
        if (p->zeros >= 2)
            return NULL;         /* the end: the rest is the record's padding */
        if (p->left > 0) {
            size_t k = (size_t)p->left < n ? (size_t)p->left : n;
            if (p->ext) {
                memcpy(p->ext_buf + p->ext_len, b, k);
                p->ext_len += k;
            } else if (p->fd >= 0) {
                for (size_t off = 0; off < k;) {
                    ssize_t w = write(p->fd, b + off, k - off);
                    if (w < 0 && errno == EINTR)
                        continue;
                    if (w < 0)
                        return strerror(errno);
                    off += (size_t)w;
                }
            }
            p->left -= (int64_t)k;
            b += k;
            n -= k;
            if (p->left == 0 && p->ext) {
                const char *err = on_ext_done(p);
                if (err)
                    return err;
            }
            if (p->left == 0 && p->fd >= 0) {
                const char *err = finish_file(p);
                close_parent(p);
                if (err)
                    return err;
            }
            continue;
        }
        if (p->pad > 0) {
            size_t k = p->pad < n ? p->pad : n;
            p->pad -= k;
            b += k;
            n -= k;
            continue;
        }
        size_t k = BLOCK - p->hlen < n ? BLOCK - p->hlen : n;
        memcpy(p->hdr + p->hlen, b, k);
        p->hlen += k;
        b += k;
        n -= k;
        if (p->hlen == BLOCK) {
            p->hlen = 0;
            const char *err = on_header(p);
            if (err)
                return err;
            if (p->left == 0 && p->fd >= 0) {   /* an empty file */
                err = finish_file(p);
                close_parent(p);
                if (err)
                    return err;
            }
            if (p->left == 0 && p->ext && (err = on_ext_done(p)))
                return err;
        }
    }
    return NULL;
}

/* The directories' modes and mtimes, deepest first: their contents are written. */
static void finish_dirs(struct put *p) {
    for (size_t i = p->ndirs; i-- > 0;) {
        struct dirmeta *d = &p->dirs[i];
        char *last;
        const char *why;
        int parent = open_parent(p->root, d->name, &last, &why);
        if (parent < 0)
            continue;
        struct tar_entry e = {.mtime = d->mtime, .uid = d->uid, .gid = d->gid};
        int fd = openat(parent, last, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0) {
            fchmod(fd, d->mode & 07777);
            close(fd);
            set_owner_times(parent, last, &e);
        }
        if (parent != p->root)
            close(parent);
    }
}

void put_frame(struct xfer *x, int kind, const unsigned char *b, size_t n) {
    struct put *p = x->p;
    const char *err = NULL;
    if (kind == CREDIT) {
        send_error(ERROR, x->chan, "CREDIT on a FILE_PUT chan");
        return;
    }
    if (kind == DATA) {
        err = put_feed(p, b, n);
        if (!err) {
            send_credit(x->chan, (int64_t)n);
            return;
        }
    } else if (p->zeros < 2 && (p->left > 0 || p->pad > 0 || p->hlen > 0 || p->ext)) {
        err = "the tar stream ended part way through an entry (truncated)";
    } else {
        finish_dirs(p);
        begin();
        send_frame(DONE, x->chan);
        xfer_release(x);
        return;
    }
    send_error(ERROR, x->chan, "%s%s: %s", p->e.name[0] ? "entry " : "",
               p->e.name[0] ? shown(p->e.name) : "the tar stream", err);
    xfer_release(x);
}
