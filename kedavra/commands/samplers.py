"""`kedavra samplers`: the sampler tables: kedavra's own plans with the names diffusers, A1111 and ComfyUI use, and
the samplers run as A1111 / ComfyUI run them (with a schedule type)."""

from __future__ import annotations

from kedavra.diffusion.samplers import SAMPLERS
from kedavra.diffusion.samplers.k_diffusion import K_SAMPLERS, comfyui_names
from kedavra.diffusion.sigmas import schedule_type_label


def register(subparsers) -> None:
    parser = subparsers.add_parser("samplers", help="list the samplers and their names in diffusers, A1111, ComfyUI",
                                   description="List kedavra's samplers with the names other tools give them, then "
                                               "the samplers run as A1111 / ComfyUI run them (--schedule-type).")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.set_defaults(func=run)


def _format(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool, code_columns=(0,)) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"`{c}`" if i in code_columns and c != "-" else c for i, c in enumerate(r)) + " |"
                  for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header] + rows)


def sampler_table(markdown: bool) -> str:
    """kedavra's samplers (its own plans; diffusers' schedulers)."""
    header = ("kedavra", "A1111", "ComfyUI", "diffusers", "stochastic", "evals (n steps)")
    rows = [(s.name, s.a1111 or "-", s.comfyui or "-", s.diffusers, "yes" if s.stochastic else "no",
             ("n" if s.evaluations_per_step == 1 else "2n-1") + ("+1" if s.extra_evaluations else ""))
            for s in SAMPLERS.values()]
    return _format(header, rows, markdown, code_columns=(0, 3))


def k_sampler_table(markdown: bool) -> str:
    """The samplers run as A1111 / ComfyUI run them, with what "Automatic" means for each in A1111."""
    header = ("A1111", "ComfyUI", "A1111's Automatic", "noise")
    rows = []
    for s in K_SAMPLERS:
        automatic = "own timesteps" if s.timestep_grid else schedule_type_label(s.schedule)
        noise = "Brownian tree" if s.brownian else "per step" if s.ancestral else "-"
        rows.append((s.a1111 or "-", ", ".join(comfyui_names(s)) or "-", automatic, noise))
    return _format(header, rows, markdown, code_columns=(1,))


def run(args) -> int:
    print(sampler_table(args.markdown))
    print()
    print("With a schedule type (--schedule-type, schedule_type=), as A1111 / ComfyUI run them:")
    print(k_sampler_table(args.markdown))
    return 0
