"""``spectral-dist ablate``: expand a grid (recipe x optimizer x learning rate x seed) into runs, then print
the commands, run them one after another, or submit each as a Slurm job (sbatch); ``--dry-run`` prints what
``--run`` or ``--submit`` would do.

Paths in a grid (``output_root``, ``config_dir``, ``sbatch_template``) are relative to the current folder, or
else to the repository checkout that holds ``recipes/``; runs and submissions get them as absolute paths, so
``--run`` and ``--submit`` work from any folder. The recipes run as ``-m recipes.<name>`` with the checkout on
``PYTHONPATH``; ``sbatch`` is called in the checkout (the templates activate its ``.venv``)."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NAME = "ablate"
HELP = "expand recipe x optimizer x lr x seed into runs; print, run locally, or submit with sbatch"

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("vit_imagenet", "resnet_cifar", "gpt_lm")
OPTIMIZERS = ("adamw", "spectral_newton", "muon")
GRID_KEYS = {
    "recipes",
    "optimizers",
    "lrs",
    "seeds",
    "extra",
    "launcher",
    "output_root",
    "max_steps",
    "sbatch_template",
    "sbatch_args",
    "config_dir",
}


@dataclass
class Job:
    recipe: str
    optimizer: str
    lr: float
    seed: int
    output_dir: str
    args: list[str]  # ``-m recipes.<recipe>`` and its arguments

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.optimizer}-lr{self.lr:g}-s{self.seed}"


def checkout() -> Path | None:
    """The repository checkout with the recipes package: the current folder if it has one, else the one this
    package was installed from (an editable install), else None."""
    for root in (Path.cwd(), ROOT):
        if (root / "recipes" / "__init__.py").is_file():
            return root.resolve()
    return None


def _find(path: str | Path) -> Path:
    """``path`` as given if it exists here, else in the checkout (when it exists there), else as given."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    root = checkout()
    return root / path if root is not None and (root / path).exists() else path


def expand_grid(
    recipes, optimizers, lrs, seeds, output_root, extra=(), max_steps=None, config_dir="configs/recipes"
):
    """One :class:`Job` per (recipe, optimizer, lr, seed); output dirs ``root/recipe/optimizer/lr<lr>_s<seed>``.
    Each job gets the recipe's ``<config_dir>/<recipe>.yaml`` unless ``extra`` names a ``--config``."""
    for r in recipes:
        if r not in RECIPES:
            raise ValueError(f"unknown recipe {r!r}; choose from {RECIPES}")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; choose from {OPTIMIZERS}")
    if not (recipes and optimizers and lrs and seeds):
        raise ValueError("the grid needs at least one recipe, optimizer, learning rate and seed")
    jobs = []
    for recipe, opt, lr, seed in itertools.product(recipes, optimizers, lrs, seeds):
        out = str(Path(output_root) / recipe / opt / f"lr{float(lr):g}_s{int(seed)}")
        args = ["-m", f"recipes.{recipe}"]  # the recipes package, from the repository root
        cfg = Path(config_dir) / f"{recipe}.yaml"
        own_config = any(a == "--config" or str(a).startswith("--config=") for a in extra)
        if not own_config and _find(cfg).exists():
            args += ["--config", str(cfg)]
        args += [
            "--optimizer",
            opt,
            "--lr",
            f"{float(lr):g}",
            "--seed",
            str(int(seed)),
            "--output_dir",
            out,
            "--run_name",
            f"{recipe}-{opt}-lr{float(lr):g}-s{int(seed)}",
            "--wandb_group",
            f"ablate-{recipe}",
            "--progress",
            "false",
        ]
        if max_steps:
            args += ["--max_steps", str(int(max_steps))]
        args += list(extra)
        jobs.append(Job(recipe, opt, float(lr), int(seed), out, args))
    return jobs


def _executable(name: str) -> str:
    """``name`` from PATH, else the one beside this Python (an un-activated virtual environment)."""
    found = shutil.which(name)
    if found:
        return name
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def local_command(job: Job, launcher: str, resolve: bool = False) -> list[str]:
    """The launcher words plus the job's recipe arguments; ``resolve`` finds the launcher executable."""
    words = shlex.split(launcher)
    if resolve and words:
        words[0] = _executable(words[0])
        for i, w in enumerate(words[:-1]):  # the launcher's config file, found here or in the checkout
            if w == "--config_file":
                words[i + 1] = str(_find(words[i + 1]).resolve())
    return words + job.args


def sbatch_command(job: Job, template: str, sbatch_args: str = "") -> list[str]:
    return (
        ["sbatch", "--job-name", job.name, "--output", f"{job.output_dir}/slurm-%j.out"]
        + shlex.split(sbatch_args)
        + [template]
        + job.args
    )


def add_arguments(p) -> None:
    p.add_argument(
        "--grid", help="YAML with any of: " + ", ".join(sorted(GRID_KEYS)) + " (flags override it)"
    )
    p.add_argument("--recipes", nargs="+", default=None, help=f"from {RECIPES} (default: vit_imagenet)")
    p.add_argument("--optimizers", nargs="+", default=None, help=f"from {OPTIMIZERS} (default: all three)")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates (default: 1e-3)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2)")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--output_root", default=None, help="default: outputs/ablate")
    p.add_argument("--launcher", default=None, help='local launcher (default: "accelerate launch")')
    p.add_argument("--extra", default=None, help="extra recipe arguments, one quoted string")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the jobs here, one after another")
    mode.add_argument("--submit", action="store_true", help="submit each job with sbatch")
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="with --run or --submit: print the folders, logs and commands (sbatch lines) instead",
    )
    p.add_argument(
        "--sbatch_template", default=None, help="default: launch/slurm/accelerate_multinode.sbatch"
    )
    p.add_argument(
        "--sbatch_args", default=None, help='extra sbatch options, e.g. "--nodes 2 --partition gpu"'
    )


def _settings(args) -> dict:
    s = dict(
        recipes=["vit_imagenet"],
        optimizers=list(OPTIMIZERS),
        lrs=[1e-3],
        seeds=[0, 1, 2],
        max_steps=None,
        output_root="outputs/ablate",
        launcher="accelerate launch",
        extra="",
        sbatch_template="launch/slurm/accelerate_multinode.sbatch",
        sbatch_args="",
        config_dir="configs/recipes",
    )
    if args.grid:
        from .._extras import require

        require("yaml", extra="recipes", feature="spectral-dist ablate --grid")
        import yaml

        path = Path(args.grid)
        if not path.is_file():
            raise ValueError(f"--grid {args.grid}: no such file")
        grid = yaml.safe_load(path.read_text()) or {}
        if not isinstance(grid, dict) or set(grid) - GRID_KEYS:
            raise ValueError(f"--grid {args.grid}: expected a mapping with keys from {sorted(GRID_KEYS)}")
        s.update(grid)
    for k in (
        "recipes",
        "optimizers",
        "lrs",
        "seeds",
        "max_steps",
        "output_root",
        "launcher",
        "extra",
        "sbatch_template",
        "sbatch_args",
    ):
        v = getattr(args, k)
        if v is not None:
            s[k] = v
    return s


def _absolute(job: Job, root: Path | None) -> Job:
    """The job with its --config path absolute (found here or in the checkout ``root``)."""
    args = list(job.args)
    for i, a in enumerate(args[:-1]):
        if a == "--config" and not Path(args[i + 1]).is_absolute():
            args[i + 1] = str(_find(args[i + 1]).resolve())
    return Job(job.recipe, job.optimizer, job.lr, job.seed, job.output_dir, args)


def run(args) -> int:
    try:
        s = _settings(args)
        if args.run or args.submit:  # runs and sbatch jobs get absolute paths: they work from any folder
            s["output_root"] = str(Path(s["output_root"]).resolve())
        extra = shlex.split(s["extra"]) if isinstance(s["extra"], str) else list(s["extra"])
        jobs = expand_grid(
            s["recipes"],
            s["optimizers"],
            s["lrs"],
            s["seeds"],
            s["output_root"],
            extra,
            s["max_steps"],
            s["config_dir"],
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = checkout()
    if (args.run or args.submit) and root is None:
        print(
            "error: no recipes/ package here or beside the installed spectral_dist: run from the repository "
            "checkout (the recipes are not part of the installed wheel)",
            file=sys.stderr,
        )
        return 2
    if args.run or args.submit:
        jobs = [_absolute(j, root) for j in jobs]
    template = str(_find(s["sbatch_template"]).resolve()) if args.submit else None
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    failed = 0
    for job in jobs:
        if args.submit:
            cmd = sbatch_command(job, template, s["sbatch_args"])
            if args.dry_run:
                print(f"# {job.name}: output {job.output_dir}/, Slurm log {job.output_dir}/slurm-<jobid>.out")
                print(f"(cd {shlex.quote(str(root))} && {shlex.join(cmd)})")
                continue
            Path(job.output_dir).mkdir(parents=True, exist_ok=True)
            try:
                r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            except FileNotFoundError:
                print(
                    "error: sbatch not found (not on a Slurm login node?); drop --submit to print",
                    file=sys.stderr,
                )
                return 2
            if r.returncode:
                print(f"sbatch failed for {job.name}: {r.stderr.strip()}", file=sys.stderr)
                return 1
            print(f"{job.name}: {r.stdout.strip()}")
        elif args.run:
            cmd = local_command(job, s["launcher"], resolve=True)
            if args.dry_run:
                print(f"# {job.name}: output {job.output_dir}/")
                print(f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {shlex.join(cmd)}")
                continue
            print("+ " + shlex.join(cmd), flush=True)
            try:
                failed += subprocess.run(cmd, env=env).returncode != 0
            except FileNotFoundError:
                print(f"error: launcher {cmd[0]!r} not found; pass --launcher", file=sys.stderr)
                return 2
        else:
            print(shlex.join(local_command(job, s["launcher"])))
    if args.run and not args.dry_run:
        print(
            f"{len(jobs) - failed}/{len(jobs)} runs succeeded; compare them with: "
            f"spectral-dist report {s['output_root']}"
        )
    return 1 if failed else 0
