"""BENCHMARKS.md tables from `vcflash eval niah --json` reports: accuracy per (length, hops, selection) and cost.

    nice -n 15 vcflash eval niah --frames 512,2000,10000,30000 --two-hop-frames 10000 --model tiny --threads 1 \
        --json niah.json --heatmap niah.png
    python bench/bench_niah.py niah.json
"""

from __future__ import annotations

import argparse
import json
import statistics


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def accuracy(report: dict) -> list[str]:
    lines = [
        "| frames | hops | selection | needles | answer | one-word baseline | commonest answer | moment | recall "
        "| answer if recalled | Ask s (mean) |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["summary"]:
        common = f"{r.get('top_answer') or '-'} {pct(r.get('top_answer_share'))}"
        lines.append(
            f"| {r['frames']:,} | {r['hops']} | {r['selection']} | {r['n']} | {pct(r['answer'])} "
            f"| {pct(r.get('constant'))} | {common} | {pct(r['moment'])} "
            f"| {pct(r['recall'])} | {pct(r['answer_if_recalled'])} | {r['ask_s']:.2f} |"
        )
    return lines


def cost(report: dict) -> list[str]:
    """Per haystack length: the one encode, the key index (build, bytes, Search) and each selection's single-hop Ask
    latency and selection time (medians over the depths)."""
    selections = [s for s in report["config"]["selections"] if s != "oracle"]
    head = "| frames | clips | encode s | keys built s | key bytes / token bytes per clip | Search (index) ms |"
    head += "".join(f" Ask {s} s (select) |" for s in selections)
    lines = [head, "|" + "---:|" * (6 + len(selections))]
    for c in report["cost"]:
        f = c["frames"]
        asks = []
        for s in selections:
            rows = [r for r in report["rows"] if r["frames"] == f and r["hops"] == 1 and r["selection"] == s]
            ask = statistics.median(r["ask_s"] for r in rows)
            select = statistics.median(r["select_s"] for r in rows)
            asks.append(f" {ask:.2f} ({select:.2f}) |")
        keys = f"{statistics.median(c['key_build_s']):.1f}" if c["key_build_s"] else "-"
        search = f"{statistics.median(c['search_index_s']) * 1000:.0f}" if c["search_index_s"] else "-"
        ratio = f"{c.get('key_bytes_per_clip', 0):,} / {c['token_bytes_per_clip']:,}"
        lines.append(f"| {f:,} | {c['clips']:,} | {c['encode_s']:.0f} | {keys} | {ratio} | {search} |" + "".join(asks))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON written by `vcflash eval niah --json`")
    for path in parser.parse_args().reports:
        with open(path) as f:
            report = json.load(f)
        print(f"{path}: max_frames {report['config']['max_frames']}, seed {report['config']['seed']}\n")
        print("\n".join(accuracy(report)) + "\n")
        print("\n".join(cost(report)) + "\n")


if __name__ == "__main__":
    main()
