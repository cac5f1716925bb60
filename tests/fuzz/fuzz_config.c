/*
 * fuzz_config.c: libFuzzer target for the conf file parser
 * (broker/config.c). The input is a whole conf file.
 *
 * Properties: config_load_file accepts it or says why (PQ_EINVAL with a
 * message); config_validate and config_reload_file never misbehave on what
 * the parser left; and a config that loads is dumped by config_dump in a
 * form that loads back to the same config (the dump of the reload is the
 * same text), as config.h promises.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "fuzz.h"
#include "pqerr.h"

enum { DUMP_MAX = 64 * 1024 };

/* Two anonymous in-memory files, reused for every input: the conf file
 * under test and the dump. config_load_file opens them by path. */
static int conf_fd = -1, dump_fd = -1;
static char conf_path[64], dump_path[64];

static void
open_files(void)
{
    if (conf_fd >= 0) {
        return;
    }
    conf_fd = memfd_create("fuzz-conf", 0);
    dump_fd = memfd_create("fuzz-dump", 0);
    FUZZ_CHECK(conf_fd >= 0 && dump_fd >= 0);
    snprintf(conf_path, sizeof(conf_path), "/proc/self/fd/%d", conf_fd);
    snprintf(dump_path, sizeof(dump_path), "/proc/self/fd/%d", dump_fd);
}

static void
set_file(int fd, const void *data, size_t len)
{
    FUZZ_CHECK(ftruncate(fd, 0) == 0);
    FUZZ_CHECK(len == 0 || pwrite(fd, data, len, 0) == (ssize_t)len);
}

/* Dump c into the dump file and into out[DUMP_MAX]; returns the length. */
static size_t
dump(const struct config *c, char *out)
{
    ssize_t n;

    FUZZ_CHECK(ftruncate(dump_fd, 0) == 0);
    FUZZ_CHECK(lseek(dump_fd, 0, SEEK_SET) == 0);
    config_dump(c, dump_fd);
    n = pread(dump_fd, out, DUMP_MAX, 0);
    FUZZ_CHECK(n > 0 && n < DUMP_MAX);
    return (size_t)n;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char first[DUMP_MAX], second[DUMP_MAX];
    struct config c, again, live;
    char err[512] = "";
    size_t n1, n2;
    int rc;

    open_files();
    set_file(conf_fd, data, size);
    config_defaults(&c);
    rc = config_load_file(&c, conf_path, err, sizeof(err));
    FUZZ_CHECK(rc == PQ_OK || rc == PQ_EINVAL);
    FUZZ_CHECK(rc == PQ_OK || err[0] != '\0');

    /* Whatever it left, the cross-field checks and a reload cope. */
    err[0] = '\0';
    rc = config_validate(&c, err, sizeof(err));
    FUZZ_CHECK(rc == PQ_OK || (rc == PQ_EINVAL && err[0] != '\0'));
    config_defaults(&live);
    rc = config_reload_file(&live, conf_path, err, sizeof(err));
    FUZZ_CHECK(rc == PQ_OK || rc < 0);

    /* A file that loads dumps to text that loads back the same. */
    config_defaults(&c);
    if (config_load_file(&c, conf_path, err, sizeof(err)) != PQ_OK) {
        return 0;
    }
    n1 = dump(&c, first);
    config_defaults(&again);
    rc = config_load_file(&again, dump_path, err, sizeof(err));
    if (rc != PQ_OK) {
        fprintf(stderr, "the dump does not load: %s\n%.*s", err, (int)n1,
                first);
    }
    FUZZ_CHECK(rc == PQ_OK);
    n2 = dump(&again, second);
    FUZZ_CHECK(n1 == n2 && memcmp(first, second, n1) == 0);
    return 0;
}
