"""Can an instruction-conditioning design localise the cube a colour word names? (minutes on a CPU)

Why this exists: behaviour cloning gives the colour word a weak signal (only the first actions of
an episode depend on it), so a design that cannot bind word and cube shows up only after a long
training run. This isolates the binding: starting from a trained model, it trains only the
conditioning path (and the layers after it) to regress the first target cube's position from the
frames of the instruction-named tasks -- the auxiliary label of ``kv-vla train --target-aux`` --
and reports the error on held-out scenes per task. An error at the label's variance (~0.3) means
the design does not bind; ``reach`` has one colour word, so it is the clean case.

Designs (the two FiLM designs it also scored ran at commit f7ca52c, before FiLM left the model):
  highlight    colour highlight on the input pixels, backbone trained, random-shift augmentation
  highlight2   two ordered highlights (``highlight_slots=2``): the label is the first *and* second
               target, so touch_sequence's error shows whether word order reaches the image tokens

Usage: .venv/bin/python experiments/binding_feasibility.py DESIGN [--steps 1400] [--model DIR]
(--model: a trained model without the highlight, e.g. the H100 stages of models/README.md)
(reads data/demos2 and data/demos3, recorded with the `kv-vla collect` commands in models/README.md)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from kv_vla.model.compact import CompactVLA
from kv_vla.model.prompt import build_prompt
from kv_vla.train.data import aux_targets, random_shift, target_label
from kv_vla.train.model_parts import TargetHead, with_overrides
from kv_vla_sim.demos import load_episodes

TASKS = ("reach", "pick_place", "touch_sequence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("design", choices=["highlight", "highlight2"])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--model",
        required=True,
        help="a trained model without the highlight to start from (the shipped one already has it)",
    )
    parser.add_argument("--data", nargs="+", default=["data/demos2", "data/demos3"])
    parser.add_argument(
        "--save",
        default=None,
        help="save the model here afterwards (e.g. to start behaviour cloning from it)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    overrides: dict = {"highlight": True}
    if args.design == "highlight2":
        overrides["highlight_slots"] = 2
    model = with_overrides(CompactVLA.from_pretrained(args.model), overrides)
    n_targets = aux_targets(model)  # the label behaviour cloning's --target-aux gives this model
    eps = [e for d in args.data for e in load_episodes(d) if e.task in TASKS]
    frames = [np.asarray(e.frames) for e in eps]
    ids = [model.prompt_ids(build_prompt(e.instruction))[0] for e in eps]
    labels = torch.stack([target_label(e.task, e.seed, n_targets) for e in eps])
    task = np.array([e.task for e in eps])
    perm = torch.randperm(len(eps))
    train, test = perm[: int(0.85 * len(eps))], perm[int(0.85 * len(eps)) :]
    test_pix = model.pixel_values(torch.as_tensor(np.stack([frames[i][0] for i in test.tolist()])))
    head = TargetHead(model.config.num_image_tokens, model.config.hidden_size, n_targets=n_targets)
    trained = [model.film_words, model.projector, head, model.highlight, model.vision]
    params = [p for module in trained for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def predict(idx: torch.Tensor, pix: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([model.instruction_condition(ids[i]) for i in idx.tolist()])
        return head(model.encode_pixels(pix, cond))

    def train_pixels(idx: torch.Tensor) -> torch.Tensor:
        # any frame of the episode (the arm moves, the named cube's position is the label until it is
        # pushed or lifted, which happens late), shifted by up to 4 px like BC's augmentation
        fr = np.stack([frames[i][rng.integers(min(len(frames[i]), 8))] for i in idx.tolist()])
        return model.pixel_values(torch.as_tensor(random_shift(fr, 4, rng)))

    start = time.perf_counter()
    for step in range(args.steps):
        model.train()
        batch = train[torch.randint(len(train), (args.batch,))]
        loss = ((predict(batch, train_pixels(batch)) - labels[batch]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                sq = ((predict(test, test_pix) - labels[test]) ** 2).numpy()
            # one mse per target: [first] or [first, second]
            err = sq.reshape(len(sq), n_targets, 2).mean(2)
            in_task = {t: task[test.numpy()] == t for t in TASKS}
            per_task = {t: [round(float(e), 3) for e in err[m].mean(0)] for t, m in in_task.items()}
            print(
                f"{args.design} step {step} ({time.perf_counter() - start:.0f} s): train mse "
                f"{loss.item():.3f}, held-out mse {per_task}",
                flush=True,
            )
    if args.save:
        model.eval()
        model.save_pretrained(args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
