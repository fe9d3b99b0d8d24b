/* Tar headers: parsing what a host sends (hostile: every number and length is checked)
 * and writing what the agent sends. See tar.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tar.h"

/* An octal field (NUL/space padded), or GNU base-256 (first byte 0x80). */
static bool number(const unsigned char *p, size_t n, int64_t *out) {
    uint64_t v = 0;
    if (p[0] == 0x80) {
        for (size_t i = 1; i < n; i++) {
            if (v >> 55)
                return false;
            v = v << 8 | p[i];
        }
        *out = (int64_t)v;
        return true;
    }
    if (p[0] & 0x80)
        return false;            /* negative base-256: no use for it */
    size_t i = 0;
    while (i < n && (p[i] == ' ' || p[i] == 0))
        i++;
    bool any = false;
    for (; i < n && p[i] >= '0' && p[i] <= '7'; i++) {
        if (v >> 60)
            return false;
        v = v << 3 | (uint64_t)(p[i] - '0');
        any = true;
    }
    for (; i < n; i++)
        if (p[i] != ' ' && p[i] != 0)
            return false;
    *out = any ? (int64_t)v : 0;
    return true;
}

static void field_str(char *dst, const unsigned char *p, size_t n) {
    size_t len = strnlen((const char *)p, n);
    memcpy(dst, p, len);
    dst[len] = 0;
}

int tar_parse_header(const unsigned char *h, struct tar_entry *e, const char **why) {
    bool zero = true;
    for (int i = 0; i < BLOCK && zero; i++)
        zero = h[i] == 0;
    if (zero)
        return 1;
    int64_t sum = 0, want, mode;
    for (int i = 0; i < BLOCK; i++)
        sum += (i >= 148 && i < 156) ? ' ' : h[i];
    if (!number(h + 148, 8, &want) || want != sum) {
        *why = "a header's checksum does not match (not a tar stream, or a corrupt one)";
        return -1;
    }
    if (!number(h + 100, 8, &mode) || !number(h + 108, 8, &e->uid) ||
        !number(h + 116, 8, &e->gid) || !number(h + 124, 12, &e->size) ||
        !number(h + 136, 12, &e->mtime)) {
        *why = "a header holds a number that is not octal or base-256";
        return -1;
    }
    e->mode = (uint32_t)(mode & 07777);
    e->type = (char)h[156];
    if (!memcmp(h + 257, "ustar\0", 6) && h[345]) {
        char prefix[156], name[101];
        field_str(prefix, h + 345, 155);
        field_str(name, h + 0, 100);
        snprintf(e->name, sizeof e->name, "%s/%s", prefix, name);
    } else {
        field_str(e->name, h, 100);
    }
    field_str(e->link, h + 157, 100);
    return 0;
}

static bool pax_int(const char *v, size_t n, int64_t *out, bool frac_ok) {
    char buf[32];
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, v, n);
    buf[n] = 0;
    char *end;
    errno = 0;
    long long x = strtoll(buf, &end, 10);
    if (end == buf || x < 0 || errno || (*end && !(frac_ok && *end == '.')))
        return false;
    *out = x;
    return true;
}

bool tar_parse_pax(const char *d, size_t n, struct tar_entry *e, int *set) {
    size_t pos = 0;
    while (pos < n) {
        /* "LEN key=value\n", LEN counting the whole record */
        size_t len = 0, i = pos;
        while (i < n && d[i] >= '0' && d[i] <= '9' && len < 1000000)
            len = len * 10 + (size_t)(d[i++] - '0');
        if (i == pos || i >= n || d[i] != ' ' || len < 5 || len > n - pos ||
            d[pos + len - 1] != '\n')
            return false;
        const char *key = d + i + 1, *end = d + pos + len - 1;
        const char *eq = memchr(key, '=', (size_t)(end - key));
        if (!eq)
            return false;
        size_t klen = (size_t)(eq - key), vlen = (size_t)(end - eq - 1);
        const char *v = eq + 1;
#define KEY(s) (klen == sizeof(s) - 1 && !memcmp(key, s, klen))
        if (KEY("path") || KEY("linkpath")) {
            char *dst = KEY("path") ? e->name : e->link;
            if (vlen > PATH_CAP || memchr(v, 0, vlen))
                return false;
            memcpy(dst, v, vlen);
            dst[vlen] = 0;
            *set |= KEY("path") ? 1 : 2;
        } else if (KEY("size")) {
            if (!pax_int(v, vlen, &e->size, false))
                return false;
            *set |= 4;
        } else if (KEY("mtime")) {
            if (!pax_int(v, vlen, &e->mtime, true))
                return false;
            *set |= 8;
        } else if (KEY("uid") || KEY("gid")) {
            if (!pax_int(v, vlen, KEY("uid") ? &e->uid : &e->gid, false))
                return false;
            *set |= KEY("uid") ? 16 : 32;
        }
#undef KEY
        pos += len;
    }
    return true;
}

static void octal(unsigned char *p, size_t n, uint64_t v) {
    snprintf((char *)p, n, "%0*llo", (int)n - 1, (unsigned long long)v);
}

static void checksum(unsigned char *h) {
    unsigned sum = 0;
    memset(h + 148, ' ', 8);
    for (int i = 0; i < BLOCK; i++)
        sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
    h[155] = ' ';
}

static size_t pax_record(char *out, const char *key, const char *value) {
    size_t body = strlen(key) + strlen(value) + 3, len = body + 1;
    while (len != body + (size_t)snprintf(NULL, 0, "%zu", len))
        len = body + (size_t)snprintf(NULL, 0, "%zu", len);
    return (size_t)sprintf(out, "%zu %s=%s\n", len, key, value);
}

static void ustar_block(unsigned char *h, const char *name, const char *prefix,
                        const struct tar_entry *e, char type, int64_t size) {
    memset(h, 0, BLOCK);
    memcpy(h, name, strnlen(name, 100));     /* a name over 100 bytes is in the pax header */
    octal(h + 100, 8, e->mode & 07777);
    octal(h + 108, 8, (uint64_t)e->uid <= 07777777 ? (uint64_t)e->uid : 0);
    octal(h + 116, 8, (uint64_t)e->gid <= 07777777 ? (uint64_t)e->gid : 0);
    octal(h + 124, 12, (uint64_t)size <= 077777777777ULL ? (uint64_t)size : 0);
    octal(h + 136, 12, e->mtime >= 0 && (uint64_t)e->mtime <= 077777777777ULL
                           ? (uint64_t)e->mtime : 0);
    h[156] = (unsigned char)type;
    if (strlen(e->link) <= 100 && type != 'x')
        memcpy(h + 157, e->link, strlen(e->link));
    memcpy(h + 257, "ustar\0" "00", 8);
    if (prefix)
        memcpy(h + 345, prefix, strnlen(prefix, 155));
    checksum(h);
}

size_t tar_write_header(unsigned char *buf, const struct tar_entry *e) {
    char pax[3 * PATH_CAP + 256], num[32], prefix[156] = "";
    const char *name = e->name;
    size_t plen = 0, nlen = strlen(e->name), out = 0;
    bool split = false;
    if (nlen > 100) {            /* ustar's prefix/name split, at a '/' */
        for (size_t i = nlen > 101 ? nlen - 101 : 0; i < nlen && i <= 155; i++)
            if (e->name[i] == '/' && i > 0 && nlen - i - 1 <= 100 && nlen - i - 1 > 0) {
                memcpy(prefix, e->name, i);
                prefix[i] = 0;
                name = e->name + i + 1;
                split = true;
                break;
            }
        if (!split)
            plen += pax_record(pax + plen, "path", e->name);
    }
    if (strlen(e->link) > 100)
        plen += pax_record(pax + plen, "linkpath", e->link);
    if ((uint64_t)e->size > 077777777777ULL) {
        snprintf(num, sizeof num, "%lld", (long long)e->size);
        plen += pax_record(pax + plen, "size", num);
    }
    if ((uint64_t)e->uid > 07777777) {
        snprintf(num, sizeof num, "%lld", (long long)e->uid);
        plen += pax_record(pax + plen, "uid", num);
    }
    if ((uint64_t)e->gid > 07777777) {
        snprintf(num, sizeof num, "%lld", (long long)e->gid);
        plen += pax_record(pax + plen, "gid", num);
    }
    if (plen) {
        ustar_block(buf, "././@PaxHeader", NULL, e, 'x', (int64_t)plen);
        memset(buf + BLOCK, 0, (plen + BLOCK - 1) / BLOCK * BLOCK);
        memcpy(buf + BLOCK, pax, plen);
        out = BLOCK + (plen + BLOCK - 1) / BLOCK * BLOCK;
    }
    ustar_block(buf + out, name, split ? prefix : NULL, e, e->type, e->size);
    return out + BLOCK;
}
