"""Output of a benchmark run: the printed table, the CSV, the JSON record and the plots, named by device."""
import csv
import json
import os
import re

CSV_COLUMNS = ["device", "family", "batch", "image", "num_anchors", "num_classes", "dtype", "mode", "logits",
               "provider", "ms", "speedup_vs_eager", "speedup_vs_compile", "must_move_bytes", "gb_per_s",
               "roofline_fraction", "peak_extra_bytes", "peak_extra_per_logit_bytes", "compile_s", "loss",
               "threads"]


def device_slug(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"


def add_speedups(rows):
    """speedup_vs_eager / _vs_compile of every row: the baseline's time over this row's, same case."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for r in rows:
        group = by_case[r["case"]]
        for col, base in (("speedup_vs_eager", "torchvision eager"), ("speedup_vs_compile", "torch.compile")):
            b = group.get(base)
            r[col] = round(b["ms"] / r["ms"], 3) if b and r.get("ms") else ""
    return rows


def write_csv(rows, path, columns=CSV_COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k, "") for k in columns})


def write_json(record, path):
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)


def _short(case_name: str) -> str:
    """'retinanet b1 800x1333 A9 C80 float32 fwd+bwd' -> 'retinanet b1\nfloat32\nfwd+bwd'."""
    parts = case_name.split()
    return f"{parts[0]} {parts[1]}\n{parts[-2]}\n{parts[-1]}"


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}Mi"


def table(rows) -> str:
    head = f"{'case':46s} {'provider':18s} {'ms':>10s} {'vs eager':>9s} {'vs compile':>10s} {'GB/s':>8s} " \
           f"{'roofline':>8s} {'peak extra':>11s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        se = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") != "" else ""
        sc = f"{r['speedup_vs_compile']:.2f}x" if r.get("speedup_vs_compile") != "" else ""
        lines.append(f"{r['case'][:46]:46s} {r['provider']:18s} {r['ms']:10.2f} {se:>9s} {sc:>10s} "
                     f"{r['gb_per_s']:8.1f} {r['roofline_fraction']:8.1%} {_mib(r['peak_extra_bytes']):>11s}")
    return "\n".join(lines)


def plot(rows, out_dir: str, slug: str, device_name: str) -> list:
    """time and speedup vs size per dtype, peak memory, roofline fraction: PNG files, returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # size plots: the sweep and the RetinaNet cases (the same head, A = 9, C = 80, more images)
    sweep = [r for r in rows if r["family"] in ("sweep", "retinanet")] or rows
    dtypes = sorted({r["dtype"] for r in sweep})
    providers = sorted({r["provider"] for r in rows})
    paths = []

    def save(fig, name, title):
        fig.suptitle(f"{title} on {device_name}")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{name}-{slug}.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    def series(rs, provider, dtype, mode, key):
        pts = sorted((r["logits"], r[key]) for r in rs if r["provider"] == provider and r["dtype"] == dtype
                     and r["mode"] == mode and r.get(key) not in ("", None))
        return [p[0] for p in pts], [p[1] for p in pts]

    modes = [m for m in ("fwd+bwd", "fwd") if any(r["mode"] == m for r in sweep)]
    fig, axes = plt.subplots(len(modes), len(dtypes), figsize=(5 * len(dtypes), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            drawn = False
            for p in providers:
                xs, ys = series(sweep, p, dt, mode, "ms")
                if xs:
                    ax.loglog(xs, ys, "o-", label=p)
                    drawn = True
            ax.set_title(f"{mode}, {dt}")
            if not drawn:
                ax.text(0.5, 0.5, "not in this run's cases", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.set_xlabel("logits")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    save(fig, "time", "time vs size")

    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4), squeeze=False)
    for j, dt in enumerate(dtypes):
        ax = axes[0][j]
        for mode in modes:
            for key, base in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "torch.compile")):
                xs, ys = series(sweep, "focal_triton", dt, mode, key)
                if xs:
                    ax.semilogx(xs, ys, "o-", label=f"vs {base}, {mode}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"focal_triton speedup, {dt}")
        ax.set_xlabel("logits")
        ax.set_ylabel("x faster")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "speedup", "speedup vs size")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = sorted({r["case"] for r in rows if r["family"] != "sweep"}) or sorted({r["case"] for r in rows})
    width = 0.8 / max(1, len(providers))
    for k, p in enumerate(providers):
        mem = [next((r["peak_extra_per_logit_bytes"] or 0 for r in rows if r["case"] == c and r["provider"] == p), 0)
               for c in labels]
        roof = [next((r["roofline_fraction"] for r in rows if r["case"] == c and r["provider"] == p), 0)
                for c in labels]
        xs = [i + k * width for i in range(len(labels))]
        axes[0].bar(xs, mem, width, label=p)
        axes[1].bar(xs, roof, width, label=p)
    for ax, title in ((axes[0], "peak extra memory (bytes per logit; n/a shows as 0)"),
                      (axes[1], "roofline fraction (must-move bytes / time / copy bandwidth)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels([_short(lab) for lab in labels], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    save(fig, "memory-roofline", "memory and roofline")
    return paths
