"""`kedavra samplers`: the sampler table, with the names diffusers, A1111 and ComfyUI use."""

from __future__ import annotations

from kedavra.diffusion.samplers import SAMPLERS


def register(subparsers) -> None:
    parser = subparsers.add_parser("samplers", help="list the samplers and their names in diffusers, A1111, ComfyUI",
                                   description="List kedavra's samplers with the names other tools give them.")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.set_defaults(func=run)


def sampler_table(markdown: bool) -> str:
    header = ("kedavra", "A1111", "ComfyUI", "diffusers", "stochastic", "evals (n steps)")
    rows = [(s.name, s.a1111 or "-", s.comfyui or "-", s.diffusers, "yes" if s.stochastic else "no",
             "n" if s.evaluations_per_step == 1 else "2n-1") for s in SAMPLERS.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"`{c}`" if i in (0, 3) else c for i, c in enumerate(r)) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header] + rows)


def run(args) -> int:
    print(sampler_table(args.markdown))
    return 0
