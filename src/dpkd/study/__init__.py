"""`dpkd study RECIPE` (and `dpkd demo`, the same on the bundled recipe): a complete distillation study on
generated tasks, small enough for a laptop CPU.

Stages, each written under `--out` and marked done by a small file in `<out>/stages/` once its outputs
are complete (so Ctrl-C leaves a run that the next invocation resumes, redoing only the stage it cut):

    data/{train,dev,test}.jsonl      dpkd.tasks, deterministic from the recipe's seed
    tokenizer/                       byte-level BPE trained on the train split
    teacher/                         a Llama-style model trained from scratch with method `sft`
    student_init/                    the student's random initialisation, shared by every method
    warm_start/                      with `init: sft`: the student trained with `sft` from student_init
    runs/<entry>[_s<seed>]/          DistillationTrainer, the same step budget for every method, from
                                     student_init (`init: scratch`) or warm_start (`init: sft`); one run
                                     per training seed with `training_seeds`; an entry of distill.methods is
                                     a method or a named variant of one (`method:`); with `select_on_dev`,
                                     the step that scored best on dev is saved (dev_selection.json)
    <run>/eval/metrics.json          dpkd.evaluation.evaluate_model on the test split, several seeds
    report/report.md, *.png          dpkd.report.write_report; report/summary.md: the results table
                                     and the paired table (each method − sft, per training seed)

With `teacher.model` (a registered name such as `smollm2-135m-instruct`, or a saved folder) the same stages
run on a real pretrained teacher instead: the data is a bundled set split into train and dev, the tokenizer
is the teacher's, the teacher is fine-tuned with `sft` first, the student is made of some of its blocks, and
every run is evaluated on several bundled sets (`dpkd.study.pretrained`; configs/study/smollm2-*.yaml).

The modules: `recipe` (the YAML recipe, checked before any work), `stages` (the table of stages: what
each needs, what its key hashes, what runs it), `build` (what the stages make), `workers` (the worker
processes and the teacher's data-parallel ranks), `progress` (the parent's board), `runner`
(`run_stages`, `run_study`, `run_demo`) and `pretrained` (the keys, stages and tables of a study of a
pretrained teacher). Importing any of them loads neither torch nor transformers.
"""

from dpkd.study.build import paired_differences
from dpkd.study.recipe import (
    METHODS,
    PROFILES,
    DemoError,
    DemoRecipe,
    load_demo_recipe,
    parse_training_seeds,
    study_runs,
    training_configs,
)
from dpkd.study.runner import run_demo, run_stages, run_study
from dpkd.study.stages import STAGES, Stage, StageMarkers, stage_keys, study_stages
from dpkd.study.workers import resolve_parallelism, train_data_parallel

__all__ = [
    "METHODS", "PROFILES", "STAGES", "DemoError", "DemoRecipe", "Stage", "StageMarkers", "load_demo_recipe",
    "paired_differences", "parse_training_seeds", "resolve_parallelism", "run_demo", "run_stages", "run_study",
    "stage_keys", "study_runs", "study_stages", "train_data_parallel", "training_configs",
]
