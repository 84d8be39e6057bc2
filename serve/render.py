"""Human-readable renderings of serving results (the CLI prints these without --json)."""
from __future__ import annotations


def render_ready(r: dict) -> str:
    lines = [f"Triton ready in {r['ready_seconds']:.1f} s (pid {r['pid']}): {r['http']}  {r['grpc']}  metrics {r['metrics']}",
             f"  dynamic batching up to {r['max_batch']} images, max queue delay {r['queue_delay_us']} us, "
             f"{r['instances']} instance(s) per model"]
    for m in r["models"]:
        lines.append(f"  {m['name']} (uint8 {m['input'][2]}) and {m['encoded']} (image files): {m['predictor']}, "
                     f"crops {m['crops']}, top {m['topk']} of {m['classes']} classes; {m['source']}")
    lines.append("  stop with Ctrl-C or SIGTERM (in-flight requests finish first)")
    return "\n".join(lines)


def render_stopped(r: dict) -> str:
    return f"Triton stopped ({r['stopped_by']})"


def render_server_bench(r: dict) -> str:
    lines = [f"{r['model']} on {r['server']}: {r['batch']} image(s) per request, crops {r['crops']}, "
             f"{r['tool']}, {r['seconds']:.0f} s, {r['requests']} requests, {r['failed_requests']} failed"]
    base = r.get("in_process")
    if base:
        lines.append(f"  in-process ({base['predictor']}, batch {base['batch']}): {base['images_per_s']:.1f} images/s, "
                     f"p50 {base['p50_ms']:.2f} ms, p99 {base['p99_ms']:.2f} ms")
    lines.append(f"  {'concurrency':>11} {'images/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'queue ms':>9}"
                 + ("  vs in-process" if base else ""))
    for row in r["rows"]:
        line = (f"  {row['concurrency']:>11} {row['images_per_s']:>9.1f} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f} {row['server_queue_ms']:>9.2f}")
        if base:
            line += f"  {100 * row['vs_in_process']:>12.0f} %"
        lines.append(line)
    return "\n".join(lines)


def render_repository(r: dict) -> str:
    lines = [f"Triton model repository {r['repository']} ({len(r['models'])} models):"]
    for m in r["models"]:
        io = ", ".join(f"{t['name']} {t['type'][5:]} {t['dims']}" for t in m["inputs"] + m["outputs"])
        lines.append(f"  {m['name']}: {m['platform']}, max_batch_size {m['max_batch_size']}; {io}")
    return "\n".join(lines)
