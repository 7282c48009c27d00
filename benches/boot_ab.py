#!/usr/bin/env python3
"""Two or more ember builds booting the test guest side by side: one `ember run` of each in turn
(the order reversed every other round, so that neither always runs first), then the p50 of each
build's spawn->exit wall time and CPU time (user + system, all threads, from the kernel's
accounting of the finished child) and its minor page faults, each as a ratio to the first build.

    python3 benches/boot_ab.py [-n 400] [--cmdline guest.minimal] OLD=PATH NEW=PATH [...] [-- ARGS]

ARGS are passed to every `ember run` (say `--log-level info --boot-timer`). This is how a change
to the boot path is measured against the build before it (docs/benchmarking.md, "Before and
after"), where `ember bench boot` cannot run an older ember that lacks its options.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "..", "tests", "guest", "target", "release", "ember-test-guest")


def children_usage():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=400)
    parser.add_argument("--cmdline", default="guest.minimal")
    parser.add_argument("--kernel", default=GUEST)
    parser.add_argument("builds", nargs="+", metavar="LABEL=PATH")
    args = parser.parse_args(argv)
    builds = []
    for spec in args.builds:
        label, sep, path = spec.partition("=")
        if not sep or not os.access(path, os.X_OK):
            sys.exit(f"boot_ab: {spec!r} is not LABEL=PATH of an executable ember")
        builds.append((label, path))
    if not os.path.exists(args.kernel):
        sys.exit(f"boot_ab: no test guest at {args.kernel}: (cd tests/guest && cargo build --release)")
    results = {label: ([], [], []) for label, _ in builds}
    for round_ in range(args.runs):
        for label, path in builds if round_ % 2 == 0 else builds[::-1]:
            cpu0, faults0 = children_usage()
            start = time.perf_counter()
            done = subprocess.run(
                [path, "run", "--kernel", args.kernel, "--cmdline", args.cmdline] + extra,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - start
            cpu1, faults1 = children_usage()
            if done.returncode != 0:
                sys.exit(f"boot_ab: {label} exited with {done.returncode}")
            results[label][0].append(wall * 1e3)
            results[label][1].append((cpu1 - cpu0) * 1e3)
            results[label][2].append(faults1 - faults0)
    base_wall = statistics.median(results[builds[0][0]][0])
    base_cpu = statistics.median(results[builds[0][0]][1])
    print(f"{args.runs} runs each, alternating; p50 (ratio to {builds[0][0]})")
    for label, _ in builds:
        wall, cpu, faults = (statistics.median(v) for v in results[label])
        print(
            f"{label:12s} spawn->exit {wall:6.2f} ms ({wall / base_wall:.3f}x)  "
            f"CPU {cpu:6.2f} ms ({cpu / base_cpu:.3f}x)  minor faults {faults:.0f}"
        )


if __name__ == "__main__":
    main()
