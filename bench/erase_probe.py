"""Quick erase probe: one concept, config variants as JSON, rates of the concept, its same-axis neighbours,
two cross-axis concepts and one synonym on few samples. Used to choose EraseConfig's defaults.

Usage: python bench/erase_probe.py WEIGHTS_DIR CONCEPT SAMPLES '{"label": {"lr": 0.01, ...}, ...}'
"""
import json
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from erase_core.sandbox.pipeline import SandboxWorld
from erase_core.sandbox.erase_sets import sandbox_concept_set
from erase_core.sandbox.prompts import concept_prompt
from erase_core.train import EraseConfig, erase
from erase_core.evaluate import found_rate
from erase_core.sandbox.world import AXES, CONCEPTS
wdir, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
variants = json.loads(sys.argv[4])
w = SandboxWorld.load(wdir)
ax = CONCEPTS[name].axis
probes = {x: concept_prompt(x, ax) for x in AXES[ax] if x in CONCEPTS}
other = {"shape": ("circle", "a red circle"), "colour": ("star", "a red star"), "placement": ("star", "a star in the west")}
def rates(tr):
    r = {x: round(found_rate(w, p, x, n, seed=77, transformer=tr)) for x, p in probes.items()}
    for other_axis, xs in (("placement", ("west", "northeast")), ("colour", ("blue", "green"))):
        if other_axis != ax:
            for x in xs:
                r["x:" + x] = round(found_rate(w, concept_prompt(x, other_axis), x, n, seed=77, transformer=tr))
            break
    syn = CONCEPTS[name].synonyms[0]
    r["syn:" + syn] = round(found_rate(w, concept_prompt(syn, ax), name, n, seed=77, transformer=tr))
    return r
print("base", rates(None), flush=True)
for label, kw in variants.items():
    t = time.time()
    res = erase(w, sandbox_concept_set(name), EraseConfig(**kw))
    tt = time.time() - t
    r = rates(res.model)
    nb = [v for k, v in r.items() if k != name and not k.startswith("syn")]  # same-axis and cross-axis
    print(label, f"{tt:.0f}s", name, r[name], "neighbours mean", round(sum(nb)/len(nb)), "min", min(nb), r, flush=True)
