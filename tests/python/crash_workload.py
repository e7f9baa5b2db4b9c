"""A verifying write workload for the crash test, on libnbd (run with Debian's /usr/bin/python3).

usage: crash_workload.py URI FIRST_WRITE BLOCKS FLUSH_EVERY

Writes numbered 4 KiB blocks, write number FIRST_WRITE onwards, each to block
(write * 7919) % BLOCKS with contents that name the write and the block (see
tests/src/content.rs, `crash_block`: keep the two in step). Every write numbered 9 mod 10 is a
write-zeroes of its block instead (NBD_CMD_WRITE_ZEROES), so replay of zero extents is tested
too. After every FLUSH_EVERY writes it
flushes, and once the flush has returned prints `flushed N`: every write numbered below N had
completed before that flush completed. It writes until the connection fails (the test kills the
gateway), then prints `failed at W` (W: the write or flush number in progress, which may or may
not have reached the gateway) and exits with status 3.
"""

import struct
import sys

import nbd

MAGIC = 0x6267637261736821
MULTIPLIER_WRITE = 0x9E3779B97F4A7C15
MULTIPLIER_BLOCK = 0xC2B2AE3D27D4EB4F
MULTIPLIER_WORD = 0x94D049BB133111EB
MASK = (1 << 64) - 1
BLOCK_SIZE = 4096
WORDS = BLOCK_SIZE // 8
STRIDE = 7919


def block_contents(write, block):
    base = ((write * MULTIPLIER_WRITE) & MASK) ^ ((block * MULTIPLIER_BLOCK) & MASK)
    words = [MAGIC, write, block]
    words.extend((base + index * MULTIPLIER_WORD) & MASK for index in range(3, WORDS))
    return struct.pack("<%dQ" % WORDS, *words)


def main():
    uri, first, blocks, flush_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    handle = nbd.NBD()
    handle.connect_uri(uri)
    print("connected", flush=True)
    write = first
    try:
        while True:
            block = (write * STRIDE) % blocks
            if write % 10 == 9:
                handle.zero(BLOCK_SIZE, block * BLOCK_SIZE)
            else:
                handle.pwrite(block_contents(write, block), block * BLOCK_SIZE)
            write += 1
            if (write - first) % flush_every == 0:
                handle.flush()
                print("flushed %d" % write, flush=True)
    except nbd.Error as error:
        print("failed at %d: %s" % (write, error), flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
