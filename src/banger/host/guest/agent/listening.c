/* LISTENING: the guest's listening TCP sockets and bound, unconnected UDP sockets, v4 and
 * v6, from /proc/net/{tcp,tcp6,udp,udp6}, with the processes holding them (found through
 * the socket inodes in /proc/PID/fd). What `ss -H -l -n -t -u -p` shows, without ss. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define MAX_SOCKS 2048
#define MAX_OWNERS 8             /* processes named per socket */

struct sock {
    const char *proto;           /* "tcp" or "udp" */
    char addr[INET6_ADDRSTRLEN];
    bool any6;                   /* "::": dual-stack unless v4 holds the same port */
    unsigned port;
    unsigned long inode;
    int nown;
    long pid[MAX_OWNERS];
    char comm[MAX_OWNERS][32];
};

static struct sock socks[MAX_SOCKS];
static int nsocks;

/* One /proc/net table: TCP in LISTEN (0A), UDP unconnected (07). */
static void read_table(const char *path, const char *proto, bool v6, const char *state) {
    char line[512];
    FILE *f = fopen(path, "re");
    if (!f)
        return;
    if (!fgets(line, sizeof line, f)) {      /* the header */
        fclose(f);
        return;
    }
    while (nsocks < MAX_SOCKS && fgets(line, sizeof line, f)) {
        char local[64], st[8];
        unsigned long inode;
        /* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
        if (sscanf(line, "%*s %63s %*s %7s %*s %*s %*s %*s %*s %lu", local, st, &inode) != 3 ||
            strcmp(st, state))
            continue;
        char *colon = strchr(local, ':');
        if (!colon)
            continue;
        *colon = 0;
        struct sock *s = &socks[nsocks];
        *s = (struct sock){.proto = proto, .port = (unsigned)strtoul(colon + 1, NULL, 16),
                           .inode = inode};
        /* The address is the kernel's bytes, each u32 printed in the host's order. */
        uint32_t w[4];
        size_t words = v6 ? 4 : 1;
        if (strlen(local) != words * 8)
            continue;
        for (size_t i = 0; i < words; i++) {
            char hex[9];
            memcpy(hex, local + i * 8, 8);
            hex[8] = 0;
            w[i] = (uint32_t)strtoul(hex, NULL, 16);
        }
        if (!inet_ntop(v6 ? AF_INET6 : AF_INET, w, s->addr, sizeof s->addr))
            continue;
        s->any6 = v6 && !strcmp(s->addr, "::");
        nsocks++;
    }
    fclose(f);
}

/* Which processes hold each socket: every /proc/PID/fd/N that links to socket:[inode]. */
static void find_owners(void) {
    DIR *proc = opendir("/proc");
    struct dirent *pe;
    while (proc && (pe = readdir(proc))) {
        if (!isdigit((unsigned char)pe->d_name[0]))
            continue;
        char path[600], link[64], comm[32] = "";
        snprintf(path, sizeof path, "/proc/%s/fd", pe->d_name);
        DIR *fds = opendir(path);
        struct dirent *fe;
        while (fds && (fe = readdir(fds))) {
            snprintf(path, sizeof path, "/proc/%s/fd/%s", pe->d_name, fe->d_name);
            ssize_t n = readlink(path, link, sizeof link - 1);
            unsigned long inode;
            if (n <= 0)
                continue;
            link[n] = 0;
            if (sscanf(link, "socket:[%lu]", &inode) != 1)
                continue;
            for (int i = 0; i < nsocks; i++) {
                struct sock *s = &socks[i];
                if (s->inode != inode || s->nown >= MAX_OWNERS)
                    continue;
                if (!comm[0]) {
                    snprintf(path, sizeof path, "/proc/%s/comm", pe->d_name);
                    FILE *c = fopen(path, "re");
                    if (!c || !fgets(comm, sizeof comm, c))
                        snprintf(comm, sizeof comm, "?");
                    if (c)
                        fclose(c);
                    comm[strcspn(comm, "\n")] = 0;
                    utf8_clean(comm);   /* 15 bytes of any name: maybe cut in a character */
                }
                bool seen = false;
                long pid = atol(pe->d_name);
                for (int k = 0; k < s->nown; k++)
                    seen |= s->pid[k] == pid;
                if (!seen) {
                    s->pid[s->nown] = pid;
                    snprintf(s->comm[s->nown++], sizeof s->comm[0], "%s", comm);
                }
            }
        }
        if (fds)
            closedir(fds);
    }
    if (proc)
        closedir(proc);
}

void do_listening(uint32_t chan) {
    nsocks = 0;
    read_table("/proc/net/tcp", "tcp", false, "0A");
    read_table("/proc/net/tcp6", "tcp", true, "0A");
    read_table("/proc/net/udp", "udp", false, "07");
    read_table("/proc/net/udp6", "udp", true, "07");
    find_owners();
    begin();
    bool truncated = false;
    for (int i = 0; i < nsocks; i++) {
        struct sock *s = &socks[i];
        /* ss shows a v6 wildcard that also takes v4 (IPV6_V6ONLY off) as "*". /proc does
         * not say; a v4 socket on the same port means the v6 one is v6-only. */
        const char *addr = s->addr;
        if (s->any6) {
            addr = "*";
            for (int k = 0; k < nsocks; k++)
                if (k != i && socks[k].proto == s->proto && socks[k].port == s->port &&
                    !strchr(socks[k].addr, ':'))
                    addr = "::";
        }
        for (int k = 0; k < (s->nown ? s->nown : 1); k++) {
            char entry[128];
            int len = s->nown ? snprintf(entry, sizeof entry, "%s\t%s\t%u\t%ld\t%s", s->proto,
                                         addr, s->port, s->pid[k], s->comm[k])
                              : snprintf(entry, sizeof entry, "%s\t%s\t%u", s->proto, addr,
                                         s->port);
            if (len < 0 || (size_t)len >= sizeof entry)
                continue;
            if (outlen + 5 + (size_t)len + 16 > HDR + MAX_BODY) {
                truncated = true;
                break;
            }
            put_field(1, entry, (size_t)len);
        }
    }
    if (truncated)
        put_i64(2, 1);
    send_frame(LISTENING, chan);
}
