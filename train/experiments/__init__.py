"""The paper's comparisons, rerunnable: `make compare`, `make sweep-delta`, `make sweep-sigma`, `make sweep-bases`,
`make control`, `make which-base` (and `make which-base-held-out`), and on one GPU `make sweep-resolution` and
`make score-bases` (`fracgen-train experiments NAME`).

Every run is the same pipeline at the same budget: render its data with fracgen (the CPU default's 1000 images
at 128 px, 50k points, unless the run says otherwise), pre-train the CPU preset for `--steps` steps, fine-tune on
digits 10-shot with the default fine-tuning recipe over 3 seeds, and a linear probe of the frozen features over 3
splits (a readout no fine-tuning hyper-parameter can move). A run's results are kept in its folder under
`--root` and a later target reuses them (the sweeps share runs with `compare`); the tables (CSV, markdown) and
plots (PNG, with matplotlib, `pip install fracgen[plots]`) go to `--results`, and every finished run's row is kept
there too (`RESULTS/rows/`), so a sweep split over several calls, or over machines that keep only the repository,
reruns nothing that finished. `--time-box MINUTES` starts a run only when its estimated time (`RATES`) ends inside
the box.

The house: `runner` (runs, budgets, the plan and time box, rows kept), `tables` (tables and plots), and one module
per experiment that states only what it runs, registered with `@experiment`. A new experiment is one module here,
its import below and one word in the Makefile.
"""

from . import (  # noqa: F401  (each registers its experiment)
    compare,
    control,
    score_bases,
    sweep_bases,
    sweep_delta,
    sweep_resolution,
    sweep_sigma,
    which_base,
)
from .runner import (  # noqa: F401  (the runner's API)
    BASES,
    DATA,
    EXPERIMENTS,
    RATES,
    SCRATCH,
    STEPS,
    Budget,
    Experiment,
    Rates,
    Run,
    estimate,
    execute,
    execute_all,
    experiment,
    experiment_budget,
    finetune_config,
    finished_row,
    plan,
    run_experiment,
    runner_options,
)
