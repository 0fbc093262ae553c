"""Built-in data generation: scenes/s of `write_synth_shards` on one process against all cores, side by side.

    python experiments/bench_synth.py                    # 4096 scenes at 64 px, shards of 256, 3 repeats
    python experiments/bench_synth.py --n 65536 --size 64 --shard-size 1024 --repeats 1   # a GPU node's cores

Prints the median scenes/s of each, the speed-up and the speed-up per core, and checks that both wrote the same bytes
(each shard is a pure function of its sample indices). Starting the worker processes is part of the parallel run's
time, as it is for a user.
"""
import argparse, hashlib, os, statistics, sys, tempfile, time
from pathlib import Path
from qclip.data.synth import write_synth_shards

def _run(args, out, processes):
    t0 = time.perf_counter()
    paths = write_synth_shards(args.dataset, out, args.n, size=args.size, shard_size=args.shard_size, split='train', processes=processes)
    dt = time.perf_counter() - t0
    return dt, [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dataset', default='synth-datacompdr'); ap.add_argument('--n', type=int, default=4096)
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--shard-size', type=int, default=256)
    ap.add_argument('--processes', type=int, default=0, help='parallel run: 0 = every core')
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    procs = args.processes or cores
    times = {1: [], procs: []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for p in (1, procs):  # interleaved, so that a change in machine load hits both alike
                dt, sha = _run(args, Path(d)/f'{p}-{r}', p)
                times[p].append(dt)
                if p == 1: ref = sha
                else: assert sha == ref, 'parallel shards differ from the single-process ones'
    one, par = statistics.median(times[1]), statistics.median(times[procs])
    print(f"{args.dataset}: {args.n} scenes at {args.size} px, shards of {args.shard_size}, {cores} cores, median of {args.repeats}")
    print(f"  1 process      {args.n / one:9.1f} scenes/s  ({one:.2f} s)")
    print(f"  {procs:2d} processes   {args.n / par:9.1f} scenes/s  ({par:.2f} s)")
    print(f"  speed-up {one / par:.2f}x on {procs} processes = {one / par / procs:.2f} per core; same bytes: yes")

if __name__ == '__main__': sys.exit(main())
