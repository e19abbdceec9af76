/*
 * tcpsink: a TCP sink for the vsnoop test guest (built static by scripts/build-guest.sh,
 * installed as /bin/tcpsink).
 *
 * Protocol, per connection (connections are served by one forked child each):
 *   client -> sink : 8-byte big-endian length L, then L bytes
 *   sink -> client : one line "<L> <digest>\n" once all L bytes were read, then close; the
 *                    digest is the SHA-256 of the L bytes in hex, or with -k f64
 *                    "f64:<16 hex digits>" (see fletcher64 below)
 * If the client closes (or the connection fails) before L bytes arrived, the sink tries to
 * write "ERR <received> <L>\n" and closes.
 *
 * Options:
 *   -p PORT      listening port (default 5001); IPv6 dual-stack, IPv4 if IPv6 is unavailable
 *   -r BYTES     SO_RCVBUF set on the listening socket before listen() (accepted sockets
 *                inherit it); 0 = leave the default (autotuning)
 *   -c BYTES     bytes asked for per read() call (default 65536)
 *   -d MS        sleep MS milliseconds after every read()
 *   -P BYTES:MS  once BYTES have been received, stop reading for MS milliseconds (once per
 *                connection): an application that pauses and resumes (zero window)
 *   -k DIGEST    sha256 (default) or f64: a Fletcher-style sum over 64-bit words, about ten
 *                times cheaper than SHA-256 under TCG, for benchmarks where hashing every byte
 *                would make the guest's CPU the bottleneck (it still catches lost, duplicated
 *                or altered data)
 *   -D           daemonize (fork, setsid, stdio to /dev/null)
 *
 * SHA-256 per FIPS 180-4, implemented here so the guest needs no libraries.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ---- SHA-256 (FIPS 180-4) ---------------------------------------------------------------- */

typedef struct {
    uint32_t h[8];
    uint64_t len; /* bytes hashed so far */
    uint8_t buf[64];
    size_t fill;
} sha256_ctx;

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const uint8_t *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void sha256_init(sha256_ctx *c)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->len = 0;
    c->fill = 0;
}

static void sha256_update(sha256_ctx *c, const uint8_t *p, size_t n)
{
    c->len += n;
    if (c->fill) {
        size_t take = 64 - c->fill < n ? 64 - c->fill : n;
        memcpy(c->buf + c->fill, p, take);
        c->fill += take;
        p += take;
        n -= take;
        if (c->fill < 64)
            return;
        sha256_block(c->h, c->buf);
        c->fill = 0;
    }
    for (; n >= 64; p += 64, n -= 64)
        sha256_block(c->h, p);
    memcpy(c->buf, p, n);
    c->fill = n;
}

static void sha256_hex(sha256_ctx *c, char out[65])
{
    uint64_t bits = c->len * 8;
    uint8_t pad[72] = {0x80};
    size_t padlen = (c->fill < 56 ? 56 : 120) - c->fill;
    int i;
    for (i = 0; i < 8; i++)
        pad[padlen + i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, pad, padlen + 8);
    for (i = 0; i < 8; i++)
        sprintf(out + 8 * i, "%08x", c->h[i]);
    out[64] = 0;
}

/* ---- f64: Fletcher-style sum over little-endian 64-bit words ---------------------------- */

/* a = sum of the words, b = sum of the running a (both mod 2^64); the stream is cut into
 * 8-byte little-endian words, a last partial word zero-padded; the digest is a ^ rotl(b, 32)
 * printed as 16 hex digits. Order-sensitive (b), cheap (two adds per word). */
typedef struct {
    uint64_t a, b;
    uint8_t part[8];
    size_t npart;
} f64_ctx;

static uint64_t le64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, 8); /* x86-64 guest: little-endian */
    return w;
}

static void f64_update(f64_ctx *c, const uint8_t *p, size_t n)
{
    while (c->npart && n) {
        c->part[c->npart++] = *p++;
        n--;
        if (c->npart == 8) {
            c->a += le64(c->part);
            c->b += c->a;
            c->npart = 0;
        }
    }
    for (; n >= 8; p += 8, n -= 8) {
        c->a += le64(p);
        c->b += c->a;
    }
    while (n--)
        c->part[c->npart++] = *p++;
}

static void f64_hex(f64_ctx *c, char out[21])
{
    if (c->npart) {
        memset(c->part + c->npart, 0, 8 - c->npart);
        c->a += le64(c->part);
        c->b += c->a;
        c->npart = 0;
    }
    snprintf(out, 21, "f64:%016llx",
             (unsigned long long)(c->a ^ (c->b << 32 | c->b >> 32)));
}

/* ---- sink -------------------------------------------------------------------------------- */

static size_t chunk = 65536;
static long delay_ms = 0;
static uint64_t pause_at = 0;
static long pause_ms = 0;
static int have_pause = 0;
static int use_f64 = 0;

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (ms > 0 && nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads exactly n bytes (the length header); returns the count read. */
static size_t read_full(int fd, uint8_t *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    return got;
}

static void serve(int fd)
{
    uint8_t hdr[8];
    uint64_t len = 0, got = 0;
    sha256_ctx ctx;
    f64_ctx fctx = {0};
    char hex[65], line[128];
    uint8_t *buf = malloc(chunk);
    int i, paused = 0;

    if (!buf || read_full(fd, hdr, 8) != 8) {
        close(fd);
        free(buf);
        return;
    }
    for (i = 0; i < 8; i++)
        len = len << 8 | hdr[i];
    sha256_init(&ctx);
    while (got < len) {
        size_t want = len - got < chunk ? (size_t)(len - got) : chunk;
        ssize_t r = read(fd, buf, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        if (use_f64)
            f64_update(&fctx, buf, (size_t)r);
        else
            sha256_update(&ctx, buf, (size_t)r);
        got += (uint64_t)r;
        if (delay_ms > 0)
            sleep_ms(delay_ms);
        if (have_pause && !paused && got >= pause_at) {
            paused = 1;
            sleep_ms(pause_ms);
        }
    }
    if (got == len) {
        if (use_f64)
            f64_hex(&fctx, hex);
        else
            sha256_hex(&ctx, hex);
        snprintf(line, sizeof line, "%llu %s\n", (unsigned long long)len, hex);
    } else {
        snprintf(line, sizeof line, "ERR %llu %llu\n", (unsigned long long)got,
                 (unsigned long long)len);
    }
    write_all(fd, line, strlen(line));
    close(fd);
    free(buf);
}

static void usage(void)
{
    fprintf(stderr, "usage: tcpsink [-p PORT] [-r RCVBUF] [-c READ_SIZE] [-d MS] "
                    "[-P BYTES:MS] [-k sha256|f64] [-D]\n");
    exit(2);
}

static long num(const char *s)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0)
        usage();
    return v;
}

int main(int argc, char **argv)
{
    int opt, port = 5001, rcvbuf = 0, daemonize = 0, one = 1, zero = 0, ls;
    while ((opt = getopt(argc, argv, "p:r:c:d:P:k:D")) != -1) {
        switch (opt) {
        case 'p': port = (int)num(optarg); break;
        case 'r': rcvbuf = (int)num(optarg); break;
        case 'c': chunk = (size_t)num(optarg); if (!chunk) usage(); break;
        case 'd': delay_ms = num(optarg); break;
        case 'P': {
            char *colon = strchr(optarg, ':');
            if (!colon)
                usage();
            *colon = 0;
            pause_at = (uint64_t)num(optarg);
            pause_ms = num(colon + 1);
            have_pause = 1;
            break;
        }
        case 'k':
            if (!strcmp(optarg, "f64"))
                use_f64 = 1;
            else if (strcmp(optarg, "sha256"))
                usage();
            break;
        case 'D': daemonize = 1; break;
        default: usage();
        }
    }
    if (optind != argc || port < 1 || port > 65535)
        usage();

    ls = socket(AF_INET6, SOCK_STREAM, 0);
    if (ls >= 0) {
        struct sockaddr_in6 a6;
        memset(&a6, 0, sizeof a6);
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons(port);
        a6.sin6_addr = in6addr_any;
        setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (rcvbuf && setsockopt(ls, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0) {
            perror("tcpsink: SO_RCVBUF");
            return 1;
        }
        if (bind(ls, (struct sockaddr *)&a6, sizeof a6) < 0) {
            perror("tcpsink: bind");
            return 1;
        }
    } else {
        struct sockaddr_in a4;
        ls = socket(AF_INET, SOCK_STREAM, 0);
        if (ls < 0) {
            perror("tcpsink: socket");
            return 1;
        }
        memset(&a4, 0, sizeof a4);
        a4.sin_family = AF_INET;
        a4.sin_port = htons(port);
        a4.sin_addr.s_addr = htonl(INADDR_ANY);
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (rcvbuf && setsockopt(ls, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0) {
            perror("tcpsink: SO_RCVBUF");
            return 1;
        }
        if (bind(ls, (struct sockaddr *)&a4, sizeof a4) < 0) {
            perror("tcpsink: bind");
            return 1;
        }
    }
    if (listen(ls, 64) < 0) {
        perror("tcpsink: listen");
        return 1;
    }
    signal(SIGCHLD, SIG_IGN); /* children are reaped automatically */
    signal(SIGPIPE, SIG_IGN);
    if (daemonize) {
        int nul;
        pid_t pid = fork();
        if (pid < 0) {
            perror("tcpsink: fork");
            return 1;
        }
        if (pid > 0)
            _exit(0);
        setsid();
        if (chdir("/") < 0) { /* nothing to do */ }
        nul = open("/dev/null", O_RDWR);
        if (nul >= 0) {
            dup2(nul, 0);
            dup2(nul, 1);
            dup2(nul, 2);
            if (nul > 2)
                close(nul);
        }
    }
    for (;;) {
        pid_t pid;
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            if (errno != EINTR)
                sleep_ms(10);
            continue;
        }
        pid = fork();
        if (pid == 0) {
            close(ls);
            serve(fd);
            _exit(0);
        }
        if (pid < 0) /* no process left: serve it ourselves */
            serve(fd);
        else
            close(fd);
    }
}
