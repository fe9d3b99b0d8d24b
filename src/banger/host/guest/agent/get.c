/* FILE_GET: a path (never following a symlink below it) streamed as tar within the
 * host's credit, a frame at a time from the poll loop, so it never stalls other chans. */
#define _GNU_SOURCE
#include <dirent.h>
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

#define MAX_DEPTH 128            /* directories deep */

struct walk { DIR *d; size_t len; };  /* an open directory; len: its name's length */

struct get {
    unsigned char pend[TAR_HEADER_CAP];
    size_t plen, poff;
    int fd;                      /* the file whose data goes out now */
    int64_t left;
    size_t pad;
    struct walk stack[MAX_DEPTH];
    int depth;
    char path[PATH_CAP + 1];     /* the name in the tar of the entry being walked */
    bool top_done, walk_done, end_done;
    int64_t credit;
};

void get_end(struct get *g) {
    close_fd(&g->fd);
    for (int i = 0; i < g->depth; i++)
        closedir(g->stack[i].d);
    free(g);
}

bool get_wants(const struct get *g) { return g->credit > 0; }

void get_credit(struct get *g, int64_t bytes) { g->credit += bytes; }

void file_get(uint32_t chan, const unsigned char *b, size_t n) {
    char path[PATH_CAP + 1];
    int64_t window;
    if (!path_field(chan, b, n, "FILE_GET", path))
        return;
    if (!int_field(b, n, 2, &window) || window <= 0) {
        send_error(ERROR, chan, "FILE_GET needs WINDOW, a positive i64");
        return;
    }
    struct stat st;
    if (stat(path, &st) < 0) {    /* the top path is followed, nothing below it */
        send_error(ERROR, chan, "%s: %s", path, strerror(errno));
        return;
    }
    struct xfer *x = xfer_slot(chan);
    if (!x)
        return;
    struct get *g = calloc(1, sizeof *g);
    if (!g) {
        send_error(ERROR, chan, "out of memory");
        *x = (struct xfer){.used = false};
        return;
    }
    g->fd = -1;
    g->credit = window;
    x->get = true;
    x->g = g;
    /* The top entry: the path's last component (like `tar -C dir name`). */
    char *base = strrchr(path, '/');
    while (base && base[1] == 0 && base > path) {
        *base = 0;
        base = strrchr(path, '/');
    }
    snprintf(g->path, sizeof g->path, "%s", base && base[1] ? base + 1 : ".");
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        send_error(ERROR, chan, "%s: %s", path, strerror(errno));
        xfer_release(x);
        return;
    }
    struct tar_entry e = {.mode = st.st_mode & 07777, .mtime = st.st_mtime,
                          .uid = st.st_uid, .gid = st.st_gid};
    snprintf(e.name, sizeof e.name, "%s", g->path);
    if (S_ISDIR(st.st_mode)) {
        e.type = '5';
        g->stack[g->depth++] = (struct walk){fdopendir(fd), strlen(g->path)};
        if (!g->stack[0].d) {
            close(fd);
            g->depth = 0;
        }
    } else if (S_ISREG(st.st_mode)) {
        e.type = '0';
        e.size = st.st_size;
        fcntl(fd, F_SETFL, 0);
        g->fd = fd;
        g->left = st.st_size;
        g->pad = (size_t)((BLOCK - st.st_size % BLOCK) % BLOCK);
        g->walk_done = true;
    } else {
        close(fd);
        send_error(ERROR, chan, "%s is not a file or directory", path);
        xfer_release(x);
        return;
    }
    g->plen = tar_write_header(g->pend, &e);
}

/* The next entry of the walk into g->pend; false at the end of the walk. On an entry
 * that cannot be read the walk stops with *why. */
static bool next_entry(struct get *g, const char **why) {
    while (g->depth > 0) {
        struct walk *w = &g->stack[g->depth - 1];
        errno = 0;
        struct dirent *de = readdir(w->d);
        if (!de) {
            closedir(w->d);
            g->depth--;
            continue;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        size_t nlen = strlen(de->d_name);
        if (w->len + 1 + nlen > PATH_CAP) {
            *why = "a name over 4096 bytes";
            return false;
        }
        g->path[w->len] = '/';
        memcpy(g->path + w->len + 1, de->d_name, nlen + 1);
        int dfd = dirfd(w->d);
        struct stat st;
        if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue;            /* gone meanwhile */
        struct tar_entry e = {.mode = st.st_mode & 07777, .mtime = st.st_mtime,
                              .uid = st.st_uid, .gid = st.st_gid};
        memcpy(e.name, g->path, w->len + 1 + nlen + 1);
        if (S_ISLNK(st.st_mode)) {
            e.type = '2';
            ssize_t n = readlinkat(dfd, de->d_name, e.link, PATH_CAP);
            if (n < 0)
                continue;
            e.link[n] = 0;
        } else if (S_ISDIR(st.st_mode)) {
            e.type = '5';
            if (g->depth >= MAX_DEPTH) {
                *why = "directories nested over 128 deep";
                return false;
            }
            int fd = openat(dfd, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
            if (!d) {
                if (fd >= 0)
                    close(fd);
                *why = strerror(errno);
                return false;
            }
            g->stack[g->depth++] = (struct walk){d, w->len + 1 + nlen};
        } else if (S_ISREG(st.st_mode)) {
            e.type = '0';
            e.size = st.st_size;
            g->fd = openat(dfd, de->d_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
            if (g->fd < 0) {
                *why = strerror(errno);
                return false;
            }
            g->left = st.st_size;
            g->pad = (size_t)((BLOCK - st.st_size % BLOCK) % BLOCK);
        } else {
            continue;            /* sockets, fifos, devices: not copied */
        }
        g->plen = tar_write_header(g->pend, &e);
        g->poff = 0;
        return true;
    }
    return false;
}

/* One DATA frame of at most the credit; at the end DATA_EOF (or ERROR) and release. */
void get_pump(struct xfer *x) {
    struct get *g = x->g;
    size_t cap = g->credit < MAX_BODY ? (size_t)g->credit : MAX_BODY, n = 0;
    unsigned char *buf = out + HDR;
    const char *why = NULL;
    while (n < cap) {
        if (g->poff < g->plen) {
            size_t k = g->plen - g->poff < cap - n ? g->plen - g->poff : cap - n;
            memcpy(buf + n, g->pend + g->poff, k);
            g->poff += k;
            n += k;
        } else if (g->left > 0) {
            size_t k = (size_t)g->left < cap - n ? (size_t)g->left : cap - n;
            ssize_t r = read(g->fd, buf + n, k);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {        /* it shrank while we read: pad with zeros, like tar */
                memset(buf + n, 0, k);
                r = (ssize_t)k;
            }
            g->left -= r;
            n += (size_t)r;
        } else if (g->pad > 0) {
            size_t k = g->pad < cap - n ? g->pad : cap - n;
            memset(buf + n, 0, k);
            g->pad -= k;
            n += k;
        } else {
            close_fd(&g->fd);
            if (!g->walk_done && next_entry(g, &why))
                continue;
            if (why)
                break;
            g->walk_done = true;
            if (g->end_done)
                break;
            memset(g->pend, 0, 2 * BLOCK);   /* the end of the archive */
            g->plen = 2 * BLOCK;
            g->poff = 0;
            g->end_done = true;
        }
    }
    if (n > 0) {
        outlen = HDR + n;
        g->credit -= (int64_t)n;
        send_frame(DATA, x->chan);
    }
    if (why) {
        send_error(ERROR, x->chan, "%s: %s", shown(g->path), why);
        xfer_release(x);
    } else if (g->end_done && g->poff >= g->plen) {
        begin();
        send_frame(DATA_EOF, x->chan);
        xfer_release(x);
    }
}

