"""Command line of the distillation package.

    python -m distill train-teacher --out runs/teacher     # the shapes-world teacher (resumable)
    python -m distill train-evaluator                      # the shapes-world evaluator
    python -m distill evaluate BUNDLE --samples 180        # quality metrics of a bundle
    python -m distill run CONFIG                           # FastLightGen: teacher bundle -> 4-step student
    python -m distill importance|plan|stage2|stage3 CONFIG # one stage of that run
    python -m distill compare --student NAME=BUNDLE ...    # the comparison table (+ --grid video)
    python -m distill calibrate-attention BUNDLE -o OUT    # per-head sparse attention windows
    python -m distill convert WAN_DIR -o BUNDLE            # a diffusers Wan teacher as a bundle
    python -m distill precompute BUNDLE VIDEOS -o SHARDS   # training shards for the Wan path
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import teacher

    p = argparse.ArgumentParser(prog="python -m distill", description="FastLightGen distillation tools.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-teacher", help="train the shapes-world teacher (flow matching, CFG dropout)",
                       description="Train the shapes-world teacher on the CPU. Checkpoints atomically to OUT and "
                                   "resumes from it; writes a bundle at the end.")
    teacher.add_args(t)
    t.set_defaults(func=teacher.run)
    from . import compare, evaluate, probe, run, wan

    e = sub.add_parser("evaluate", help="prompt adherence, Frechet distance and motion of a bundle's videos")
    evaluate.add_evaluate_args(e)
    e.set_defaults(func=evaluate.run_evaluate)
    te = sub.add_parser("train-evaluator", help="train the shapes-world evaluator (colour, shape, direction)")
    evaluate.add_train_evaluator_args(te)
    te.set_defaults(func=evaluate.run_train_evaluator)
    helps = {"run": "FastLightGen end to end: importance -> plan -> stage2 -> stage3 -> student bundle",
             "importance": "Stage I: skip-one-block importance (OUT/importance.json + .png)",
             "plan": "the pruning plan from the importance and the parameter budget (OUT/plan.json)",
             "stage2": "Stage II: probabilistic pruning with self-distillation (OUT/stage2/bundle)",
             "stage3": "Stage III: well-guided DMD to the 4-step student (the student bundle)"}
    for name, text in helps.items():
        r = sub.add_parser(name, help=text, description=text + ". Reads the run config's earlier stages from its "
                           "out directory; every stage resumes where it stopped.")
        run.add_args(r)
        r.set_defaults(func=run.run_command)
    cv = sub.add_parser("convert", help="a diffusers Wan pipeline directory -> a bundle (the Wan teacher)")
    wan.add_convert_args(cv)
    cv.set_defaults(func=wan.run_convert)
    pc = sub.add_parser("precompute", help="shards of VAE latents + text states from a folder of captioned videos")
    wan.add_precompute_args(pc)
    pc.set_defaults(func=wan.run_precompute)
    pr = sub.add_parser("probe", help="does a shapes model listen to each word? flow loss with one attribute swapped")
    probe.add_args(pr)
    pr.set_defaults(func=probe.run)
    c = sub.add_parser("compare", help="the comparison table: teacher (50 steps, 4 steps) and students, one run")
    compare.add_args(c)
    c.set_defaults(func=compare.run)
    from . import calibrate

    ca = sub.add_parser("calibrate-attention", help="per-head block-sparse windows from a calibration pass",
                        description="Measure how much softmax mass each head keeps under candidate windows "
                                    "(time, space, local, global) and choose one per head under a density budget.")
    calibrate.add_args(ca)
    ca.set_defaults(func=calibrate.run)
    return p


def main(argv=None) -> int:
    from flgengine.__main__ import run_command

    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
