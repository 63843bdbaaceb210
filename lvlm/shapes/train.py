"""Train the shapes model on scenes generated on the fly.

Two image tasks, mixed 40/60, plus an optional share of plain text (`--text-share`):
  (a) description: "Describe this image." (or a paraphrase) -> "There are two trees, a house ..."
  (b) POPE-style question: "Is there a {kind} in the image?" -> "Yes" / "No", balanced; half of
      the negatives are the absent co-occurrence partner of a present object (hard negatives),
      the rest uniform over absent kinds. Half the questions carry the LLaVA-1.5 suffix.
  (c) text without an image, half of it plain language-model text ("<s>" and the human captions
      of a few other train scenes, loss on every token), half a chat turn with no image
      ("USER: Describe this image. ASSISTANT:" -> the description of some other scene). It plays
      the part of the text-only LLM a real LVLM starts from: the language prior is learned from
      text as well as from image-grounded answers, a prompt whose image was removed (VHR's and
      PAI's twin rows) gets the prior's answer as a real LLM would give it, and the heads that
      read the image have nothing to read in these rows (the dormant-head setting in which
      attention sinks form, arXiv 2410.13835).
  (d) a share of the rows of (c) (`--backcopy`, 0.4 in the shipped recipe; 0 turns it off),
      plain text of that paper's Bigram-Backcopy task in the world's words
      (`text.backcopy_text`): a copy is needed after a trigger word only, so the head that
      copies must do nothing everywhere else. It gives the model its BOS attention sink.
  (e) optionally (`--letterbox`, 0 in the shipped recipe), a share of the image rows shows its
      scene letterboxed: drawn 96 x 72 and padded to square with the CLIP mean colour, as
      LLaVA-1.5 pads wide photos, so some patches carry nothing at all (world.py).
Stages, in the order a real LVLM is built (not the shipped recipe, which trains everything jointly
from step 0): `--init-from RUN` starts from another run's weights and tokenizer with a fresh
optimizer and schedule, `--freeze-lm` trains only the vision tower, the projector and the probes
(LLaVA-1.5's alignment stage, with the tower trained too because ours has no pretraining), and
`--data-offset` moves a stage onto examples the earlier stages never saw.
The loss is next-token cross entropy on the answer tokens (and the closing </s>) only, averaged
per example so that a two-token answer weighs as much as a caption, plus two auxiliary probes
that are discarded after training (ObjectProbe, QuestionProbe: why in their docstrings).

`--world detail` trains on the detailed world instead (detail.py, `make_detail_example`): half
the image rows ask for the detailed 40-120 word description, a tenth for the short one, the rest
are the same questions; the rows without an image are Bigram-Backcopy text or detailed
descriptions of other scenes (docs/shapes-world.md). `--length-groups N` runs each batch as N
parts of similar length (the same gradient with less padding), `--bf16` under bfloat16 autocast.

Batch b of the run is built from train-split scenes b*B .. b*B+B-1, so a resumed run sees exactly
the data it would have seen; checkpoints hold model, optimizer, schedule, step, RNG states and the
training time so far. `--budget-hours H` stops a run, over all its sessions, once it has
trained H hours on `--budget-clock` (wall or process CPU time; the ledger spent.json counts time
lost after the last checkpoint too: budget.py), and exports what it has; `--ckpt-minutes M` checkpoints by wall time as well as every `--ckpt-every`
steps.

    python -m lvlm_hallu.lvlm.shapes.train --out runs/shapes --steps 2200 --threads 2 [--resume]
    python -m lvlm_hallu.lvlm.shapes.train --out runs/shapes --steps 2900 --resume   # the shipped model's schedule

(docs/shapes-model.md: the second command extends the cosine schedule of the first.)

    python -m lvlm_hallu.lvlm.shapes.train --out ~/.cache/lvlm-hallu/train/shapes-detail --world detail \
        --preset detail --steps 1500 --threads 1 --length-groups 3 --bf16 --budget-hours 3 --budget-clock cpu \
        --ckpt-minutes 10 --log-every 10 [--resume]          # the detailed world's model (docs/shapes-world.md)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from lvlm_hallu.lvlm.shapes import model as M
from lvlm_hallu.lvlm.shapes import detail, detail_text, text, world
from lvlm_hallu.lvlm.shapes.budget import CLOCKS, Ledger, Spent

IGNORE = -100
QUESTION_PROBE_LAYER = 2  # hidden_states index: output of the 2nd of 4 decoder layers
# Questions are the harder skill (match a word of the prompt against the image) and carry one
# informative token against a caption's dozen, so they get the larger share of examples.
CAPTION_SHARE = 0.4
TEXT_SCENES = 6  # captions of this many scenes make one plain-text row (~70 tokens)
# Plain-text rows describe scenes from their own index range, disjoint from the image rows'.
TEXT_SCENE_OFFSET = 50_000_000
# Image rows of the detailed world: detailed descriptions, short descriptions, the rest questions.
DETAIL_SHARE, SHORT_SHARE = 0.5, 0.1


def make_example(index: int, text_share: float = 0.0, text_scenes: int = TEXT_SCENES,
                 backcopy: float = 0.0, letterbox: float = 0.0) -> tuple[object, str | None, str, tuple[str, ...]]:
    """(image, prompt, answer, present kinds) for training example `index`.

    A row without an image (probability `text_share`) has image None: either plain text
    (None, None, text, ()), the human captions of `text_scenes` scenes with the loss on the whole
    text, or a chat turn without an image (None, prompt, description of another scene, ()).
    A share `backcopy` of those rows is plain text of the Bigram-Backcopy task instead
    (`text.backcopy_text`); the other rows are the same examples whatever `backcopy` is.
    A share `letterbox` of the image rows shows its scene letterboxed (`world.make_scene`).
    """
    rng = random.Random(f"task/{index}")
    if text_share > 0 and random.Random(f"text/{index}").random() < text_share:
        kind = random.Random(f"backcopy/{index}")
        if backcopy > 0 and kind.random() < backcopy:
            return None, None, text.backcopy_text(kind), ()
        if rng.random() < 0.5:
            scene = world.make_scene("train", TEXT_SCENE_OFFSET + index * TEXT_SCENES)[0]
            return None, rng.choice(text.DESCRIBE_PROMPTS), text.model_caption(scene), ()
        captions = []
        for j in range(text_scenes):
            scene = world.make_scene("train", TEXT_SCENE_OFFSET + index * text_scenes + j)[0]
            captions.append(rng.choice(text.human_captions(scene, rng)))
        return None, None, " ".join(captions), ()
    scene, img = world.make_scene("train", index, letterbox=letterbox)
    present = sorted(scene.counts())
    if rng.random() < CAPTION_SHARE:
        return img, rng.choice(text.DESCRIBE_PROMPTS), text.model_caption(scene), tuple(present)
    return (img, *question_example(rng, present), tuple(present))


def question_example(rng: random.Random, present: list[str]) -> tuple[str, str]:
    """(prompt, answer) of a POPE-style question about a scene with kinds `present`: "Yes" half
    the time, else "No" about an absent kind, half of those the absent partner of a present one."""
    absent = [k for k in world.CATEGORIES if k not in present]
    if rng.random() < 0.5 and present:
        kind, answer = rng.choice(present), "Yes"
    else:
        hard = [world.PARTNER[k] for k in present if world.PARTNER.get(k) in absent]
        kind = rng.choice(hard) if hard and rng.random() < 0.5 else rng.choice(absent)
        answer = "No"
    prompt = text.question(kind) + (text.POPE_SUFFIX if rng.random() < 0.5 else "")
    return prompt, answer


def make_detail_example(index: int, text_share: float = 0.0, backcopy: float = 0.0) -> tuple[object, str | None, str, tuple[str, ...]]:
    """(image, prompt, answer, present kinds) for training example `index` of the detailed world
    (detail.py), as `make_example` for world.py. Image rows: a share DETAIL_SHARE asks for the
    detailed description (detail_text.describe, one of DETAIL_PROMPTS), SHORT_SHARE for the
    one-sentence one (text.model_caption), the rest are POPE-style questions. A row without an
    image (probability `text_share`) is Bigram-Backcopy text (a share `backcopy` of them), or the
    detailed description of another scene, as plain text (half) or as a chat turn without an image.
    """
    rng = random.Random(f"detail-task/{index}")
    if text_share > 0 and random.Random(f"detail-text/{index}").random() < text_share:
        kind = random.Random(f"detail-backcopy/{index}")
        if backcopy > 0 and kind.random() < backcopy:
            return None, None, text.backcopy_text(kind), ()
        scene = detail.make_scene("train", TEXT_SCENE_OFFSET + index)[0]
        prompt = rng.choice(detail_text.DETAIL_PROMPTS) if rng.random() < 0.5 else None
        return None, prompt, detail_text.describe(scene), ()
    scene, img = detail.make_scene("train", index)
    present = sorted(scene.counts())
    r = rng.random()
    if r < DETAIL_SHARE:
        return img, rng.choice(detail_text.DETAIL_PROMPTS), detail_text.describe(scene), tuple(present)
    if r < DETAIL_SHARE + SHORT_SHARE:
        return img, rng.choice(detail_text.SHORT_PROMPTS), text.model_caption(scene), tuple(present)
    return (img, *question_example(rng, present), tuple(present))


def length_groups(examples: list, n_groups: int) -> list[list]:
    """The batch cut into `n_groups` parts of similar length (by an estimate of tokens), so that
    short questions are not padded to a 120-word description's length. Order inside kept."""
    if n_groups <= 1:
        return [examples]
    est = [(64 if e[0] is not None else 0) + len(e[1] or "") / 4 + len(e[2]) / 4 for e in examples]
    order = sorted(range(len(examples)), key=lambda i: est[i])
    size = math.ceil(len(examples) / n_groups)
    return [[examples[i] for i in sorted(order[k:k + size])] for k in range(0, len(order), size)]


def collate(processor, examples) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the answer only (on every token of a plain-text row).

    (B, T) ids; (N, 3, H, W) pixels and (N, 13) object targets for the N rows with an image.
    """
    tok = processor.tokenizer
    n_img = (world.IMAGE_SIZE // M.PATCH) ** 2
    rows, labels, word_pos = [], [], []
    for image, prompt, answer, _ in examples:
        if prompt is None:  # plain text: "<s> caption caption ... </s>", loss after the BOS
            ids = tok(answer + "</s>")["input_ids"]
            rows.append(ids)
            labels.append([IGNORE] + ids[1:])
            word_pos.append(-1)
            continue
        if image is None:  # a chat turn without an image: the template's text alone
            head = tok(f"USER: {prompt} ASSISTANT:")["input_ids"]
            at = len(head)
        else:
            head = tok(M.prompt_text(prompt))["input_ids"]
            at = head.index(M.IMAGE_ID)  # expand the one <image> into n_img placeholders
            head = head[:at] + [M.IMAGE_ID] * n_img + head[at + 1:]
        tail = tok(" " + answer + "</s>", add_special_tokens=False)["input_ids"]
        rows.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
        asked = re.match(r"Is there an? (\w+) in", prompt)
        word = tok(" " + asked.group(1), add_special_tokens=False)["input_ids"][0] if asked else None
        word_pos.append(head.index(word, at + n_img) if asked else -1)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), M.PAD_ID)
    lab = torch.full((len(rows), T), IGNORE)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    with_image = [e for e in examples if e[0] is not None]
    objects = torch.tensor([[float(k in e[3]) for k in world.CATEGORIES] for e in with_image])
    answer_yes = torch.tensor([float(e[2] == "Yes") for e in examples])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": lab,
             "objects": objects.reshape(len(with_image), len(world.CATEGORIES)),
             "word_pos": torch.tensor(word_pos), "answer_yes": answer_yes}
    if with_image:
        batch["pixel_values"] = processor.image_processor(
            [e[0] for e in with_image], return_tensors="pt")["pixel_values"]
    return batch


class ObjectProbe(torch.nn.Module):
    """Auxiliary multi-label object classifier on the projected image tokens.

    Why: LLaVA starts from a pretrained CLIP; ours starts from scratch, and through the language
    loss alone the vision tower stays blind for hundreds of steps (the LM first fits the priors).
    This probe stands in for vision pretraining: it pushes object identity into the visual tokens
    from step 0. It is trained jointly and discarded; the shipped model is plain LLaVA.

    kind "mean": a linear head on the mean visual token.
    kind "words": the score of object k is a soft maximum over visual tokens of <token, E[word k]>,
    E the LM's own (tied) word embeddings. It aligns each visual token with the word of the object
    it shows, so that "Is there a box" can find the box by plain query-key matching; with the
    mean head the yes/no answers stayed at chance for 1000 steps.
    """

    def __init__(self, model, n_objects: int, kind: str = "words", word_ids: list[int] | None = None):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.kind = kind
        if kind == "mean":
            self.head = torch.nn.Linear(hidden, n_objects)
        elif kind == "words":
            self.embed = model.get_input_embeddings()  # shared, not a copy
            self.register_buffer("word_ids", torch.tensor(word_ids), persistent=False)
            self.bias = torch.nn.Parameter(torch.zeros(n_objects))
            self.scale = torch.nn.Parameter(torch.tensor(hidden ** -0.5))
        else:
            raise KeyError(f"unknown probe kind {kind!r}; valid: mean, words")
        self.features = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = output  # (B, n_img, H) projected visual tokens

    def loss(self, objects: torch.Tensor) -> torch.Tensor:
        f = self.features
        self.features = None  # a batch of plain text only runs no projector
        if f is None or objects.shape[0] == 0:
            return objects.sum() * 0.0
        if self.kind == "mean":
            logits = self.head(f.mean(1))  # (B, n_objects)
        else:
            words = self.embed(self.word_ids)  # (n_objects, H)
            scores = torch.einsum("bth,kh->btk", f, words) * self.scale  # (B, n_img, n_objects)
            logits = torch.logsumexp(scores, dim=1) - math.log(f.shape[1]) + self.bias
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, objects)

    def state_dict(self, *args, **kwargs):
        # The embeddings belong to the model; keep only the probe's own tensors.
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("embed.")}

    def load_state_dict(self, state, strict=True):
        return super().load_state_dict(state, strict=False)


class QuestionProbe(torch.nn.Module):
    """Auxiliary yes/no head on the hidden state of the asked object's word (e.g. " box").

    Why: answering "Is there a box" takes two hops (the answer position must find the word,
    and the word must be matched against the image); with only the answer loss neither hop gets
    a first-order gradient and the answers stayed at chance for 1000 steps. Supervising the
    first hop at the word itself gives the second an easy feature to read. Discarded after
    training.
    """

    def __init__(self, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.head = torch.nn.Linear(hidden, 1)

    def loss(self, hidden_states, word_pos: torch.Tensor, answer_yes: torch.Tensor) -> torch.Tensor:
        rows = (word_pos >= 0).nonzero().squeeze(1)  # question examples only
        if rows.numel() == 0:
            return hidden_states[0].sum() * 0.0
        layer = min(self.layer, len(hidden_states) - 1)  # the tiny test preset has one layer
        h = hidden_states[layer][rows, word_pos[rows]]  # (n, H)
        return torch.nn.functional.binary_cross_entropy_with_logits(self.head(h).squeeze(1), answer_yes[rows])


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged per example, then over the batch. logits (B, T, V), labels (B, T).

    Why not transformers' token mean: a caption has ~13 answer tokens and "Yes</s>" two, so a
    token mean lets captions drown the yes/no signal and questions stay at chance for long.
    """
    logits = logits[:, :-1]  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1): token t predicts t+1
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), target, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    n = (target != IGNORE).sum(1).clamp(min=1)
    return (per_token.sum(1) / n).mean()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def save_checkpoint(path: Path, model, probe, qprobe, opt, step: int, spent: Spent = Spent()) -> None:
    """`spent`: training wall and CPU time up to this step, over all the run's sessions."""
    state = {"model": model.state_dict(), "probe": probe.state_dict(), "qprobe": qprobe.state_dict(),
             "optimizer": opt.state_dict(),
             "step": step, **asdict(spent),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash while saving never leaves a broken checkpoint


def restore(path: Path, model, probe, qprobe, opt, device) -> int:
    """Load a checkpoint into the live objects; returns the step to continue from."""
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    qprobe.load_state_dict(state["qprobe"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


def checkpoint_spent(path: Path) -> Spent:
    """Training time recorded in a checkpoint (0 for one written before it was recorded)."""
    return Spent.from_record(torch.load(path, map_location="cpu", weights_only=False))


def batch_parts(processor, examples: list, n_groups: int, device) -> list:
    """`train_step`'s parts: each length group collated, with its share of the batch's rows, of
    its image rows (object probe) and of its question rows (question probe)."""
    def is_question(e):
        return e[1] is not None and re.match(r"Is there an? (\w+) in", e[1]) is not None
    n_img = sum(e[0] is not None for e in examples)
    n_q = sum(is_question(e) for e in examples)
    parts = []
    for group in length_groups(examples, n_groups):
        batch = {k: v.to(device) for k, v in collate(processor, group).items()}
        weights = (len(group) / len(examples),
                   sum(e[0] is not None for e in group) / n_img if n_img else 0.0,
                   sum(is_question(e) for e in group) / n_q if n_q else 0.0)
        parts.append((batch, weights))
    return parts


def train_step(model, probe, qprobe, opt, params, batch, aux_weight: float, bf16: bool = False):
    """One optimizer step; returns the (answer loss, probe loss) tensors.

    `batch` is one collated batch, or a list of (batch, (answer, object probe, question probe)
    weights) parts of one batch (`length_groups`), whose gradients are summed before the step:
    with each part's weights its share of the rows each loss averages over, the losses and the
    gradient are those of the whole batch. `bf16`: the forward pass under CPU/CUDA autocast to
    bfloat16 (mixed precision, as LLaVA is trained; weights, optimizer and losses stay fp32)."""
    parts = [(batch, (1.0, 1.0, 1.0))] if isinstance(batch, dict) else batch
    loss = aux = 0.0
    for part, (w_ans, w_obj, w_q) in parts:
        objects, word_pos, answer_yes = (part.pop(k) for k in ("objects", "word_pos", "answer_yes"))
        labels = part.pop("labels")
        with torch.autocast(part["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**part, output_hidden_states=True)
        part_loss = answer_loss(out.logits, labels) * w_ans
        with torch.autocast(part["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
            part_aux = probe.loss(objects) * w_obj + qprobe.loss(out.hidden_states, word_pos, answer_yes) * w_q
        (part_loss + aux_weight * part_aux).backward()
        loss, aux = loss + part_loss.detach(), aux + part_aux.detach()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, aux


def param_groups(params, weight_decay: float, decay_1d: bool) -> list[dict]:
    """AdamW groups: every tensor decayed, or (decay_1d False) the vectors (norm gains, biases,
    the probes' scalars) exempt, as LLM pretraining recipes do (GPT-3, LLaMA). A norm gain decayed
    towards 0 works against a residual stream that keeps one dimension much larger than the rest."""
    if decay_1d:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def setup(args):
    """Processor and model: fresh, reloaded from the run dir so a resume uses the same vocab, or
    (`--init-from`) the weights and vocab of an earlier stage's finished model."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    proc_dir = args.out / "processor"
    if args.resume and proc_dir.exists():
        processor = LlavaProcessor.from_pretrained(proc_dir)
    else:
        vocab = M.Preset.from_name(args.preset).vocab_size
        processor = (LlavaProcessor.from_pretrained(args.init_from) if args.init_from is not None
                     else M.build_processor(M.build_tokenizer(vocab, args.tokenizer_scenes, args.world)))
        processor.save_pretrained(proc_dir)
    torch.manual_seed(args.seed)
    if args.init_from is not None:  # a resume then loads its own checkpoint over these weights
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = M.build_model(M.Preset.from_name(args.preset), processor.tokenizer)
    if args.vision_from is not None:  # stage 1's tower (pretrain_vision.py), the stand-in for CLIP
        model.model.vision_tower.load_state_dict(torch.load(args.vision_from, map_location="cpu"))
    if args.reset_projector:  # LLaVA's stage 1 trains a fresh projector onto the new features
        for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            layer.reset_parameters()
    if args.freeze_vision:  # as LLaVA keeps CLIP frozen
        model.model.vision_tower.requires_grad_(False)
    if args.freeze_lm:
        for p in model.model.language_model.parameters():
            p.requires_grad_(False)
        model.lm_head.requires_grad_(False)  # tied to the frozen embeddings
    return processor, model


def earlier_spent(dirs: list[Path]) -> Spent:
    """The time recorded in the ledgers (spent.json) of earlier stages' folders, summed."""
    total = Spent()
    for d in dirs:
        path = Path(d) / "spent.json"
        if not path.exists():
            raise FileNotFoundError(f"{d}: no spent.json (the ledger of a training stage)")
        rec = Spent.from_record(json.loads(path.read_text()))
        total = Spent(total.train_s + rec.train_s, total.cpu_s + rec.cpu_s)
    return total


def init_dir(path: str) -> Path:
    """--init-from: a finished run (its model/ folder) or a model folder itself."""
    p = Path(path)
    p = p / "model" if (p / "model" / "config.json").exists() else p
    if not (p / "config.json").exists():
        raise argparse.ArgumentTypeError(f"{path}: no finished model here (config.json, or a run's model/)")
    return p


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    processor, model = setup(args)
    word_ids = [processor.tokenizer(" " + k, add_special_tokens=False)["input_ids"][0]
                for k in world.CATEGORIES]
    probe = ObjectProbe(model, len(world.CATEGORIES), args.probe, word_ids)
    qprobe = QuestionProbe(model.config.text_config.hidden_size, QUESTION_PROBE_LAYER)
    model.to(args.device).train()
    probe.to(args.device)
    qprobe.to(args.device)
    own = {id(p) for p in model.parameters()}
    params = list(model.parameters()) + [p for p in probe.parameters() if id(p) not in own]
    params = [p for p in params + list(qprobe.parameters()) if p.requires_grad]  # --freeze-lm
    opt = torch.optim.AdamW(param_groups(params, args.weight_decay, args.decay_1d), lr=args.lr,
                            betas=(0.9, 0.98))
    ckpt = args.out / "checkpoint.pt"
    resumed = args.resume and ckpt.exists()
    start = restore(ckpt, model, probe, qprobe, opt, args.device) if resumed else 0
    ledger = Ledger.resume(args.out, checkpoint_spent(ckpt) if resumed else None)
    budget = args.budget_hours * 3600 if args.budget_hours else math.inf
    earlier = earlier_spent(args.earlier_runs)  # stages before this run count against its budget
    log = (args.out / "train_log.jsonl").open("a")
    t0, losses, auxes = time.time(), [], []
    last_ckpt, stopped = t0, None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    for step in bar:
        if ledger.now().on(args.budget_clock) + earlier.on(args.budget_clock) >= budget:
            stopped = step  # the budget is spent: keep what was trained, export it below
            break
        first = args.data_offset + step * args.batch_size
        if args.world == "detail":
            examples = [make_detail_example(first + j, args.text_share, args.backcopy) for j in range(args.batch_size)]
        else:
            examples = [make_example(first + j, args.text_share, args.text_scenes, args.backcopy, args.letterbox)
                        for j in range(args.batch_size)]
        if args.length_groups > 1:
            batch = batch_parts(processor, examples, args.length_groups, args.device)
        else:
            batch = {k: v.to(args.device) for k, v in collate(processor, examples).items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss, aux = train_step(model, probe, qprobe, opt, params, batch, args.aux_weight, args.bf16)
        losses.append(loss.item())
        auxes.append(aux.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        spent = ledger.write(step + 1)  # every step: an interrupted session loses little
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = min(args.log_every, len(losses))
            rec = {"step": step + 1, "loss": sum(losses[-k:]) / k, "aux": sum(auxes[-k:]) / k,
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 1),
                   **spent.rounded()}
            log.write(json.dumps(rec) + "\n")
            log.flush()
        timed = args.ckpt_minutes and time.time() - last_ckpt >= 60 * args.ckpt_minutes
        if timed or (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt, model, probe, qprobe, opt, step + 1, spent)
            last_ckpt = time.time()
    if stopped is not None:
        if stopped > start:
            save_checkpoint(ckpt, model, probe, qprobe, opt, stopped, ledger.now())
        log.write(json.dumps({"step": stopped, "stopped": "budget", "budget_hours": args.budget_hours,
                              "budget_clock": args.budget_clock}) + "\n")
    spent = ledger.write(stopped if stopped is not None else args.steps)
    log.close()
    final = args.out / "model"
    model.eval()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return {"start_step": start, "steps": args.steps if stopped is None else stopped, "losses": losses,
            "wall_s": time.time() - t0, "spent": spent, "model_dir": str(final),
            "stopped": "budget" if stopped is not None else None}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train the embedded shapes LLaVA model.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="peak learning rate (a larger one favours attention sinks: arXiv 2410.10781)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1,
                    help="AdamW weight decay (higher decay favours attention sinks: arXiv 2410.10781)")
    ap.add_argument("--preset", default="default", help="model sizes: default | tiny (tests)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--text-share", type=world.probability, default=0.25,
                    help="share of plain-text rows (no image; the LM-pretraining stand-in)")
    ap.add_argument("--text-scenes", type=int, default=TEXT_SCENES,
                    help="scenes whose captions make one plain-text row (6: ~70 tokens)")
    ap.add_argument("--backcopy", type=world.probability, default=0.4,
                    help="share of the rows without an image that are Bigram-Backcopy text (arXiv 2410.13835); "
                         "0 turns it off")
    ap.add_argument("--letterbox", type=world.probability, default=0.0,
                    help="share of image rows whose scene is drawn wide and padded to square (world.py)")
    ap.add_argument("--decay-1d", action=argparse.BooleanOptionalAction, default=True,
                    help="weight decay on norm gains and biases too (--no-decay-1d exempts them)")
    ap.add_argument("--init-from", type=init_dir, default=None,
                    help="start from this run's (or model folder's) weights and tokenizer, fresh optimizer and schedule")
    ap.add_argument("--freeze-lm", action="store_true",
                    help="train the vision tower, projector and probes only (an alignment stage)")
    ap.add_argument("--vision-from", type=Path, default=None,
                    help="load the vision tower from pretrain_vision.py's vision.pt (the stand-in for CLIP)")
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed, as LLaVA keeps CLIP")
    ap.add_argument("--reset-projector", action="store_true",
                    help="start the projector afresh (new vision features under an --init-from model)")
    ap.add_argument("--earlier-runs", type=Path, nargs="*", default=[],
                    help="folders of earlier stages whose spent.json counts against --budget-hours")
    ap.add_argument("--data-offset", type=world.count, default=0,
                    help="index of the first example (a later stage on examples an earlier one never saw)")
    ap.add_argument("--probe", default="words", choices=["words", "mean"], help="object probe kind")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the two probe losses")
    ap.add_argument("--tokenizer-scenes", type=int, default=3000, help="scenes in the BPE corpus")
    ap.add_argument("--world", default="basic", choices=M.WORLDS,
                    help="basic: world.py, the shipped model's; detail: detail.py, long detailed descriptions")
    ap.add_argument("--length-groups", type=int, default=1,
                    help="run each batch as this many parts of similar length (same gradient, less padding)")
    ap.add_argument("--budget-hours", type=float, default=None,
                    help="stop (checkpoint and export) once the run has trained this long over all its sessions")
    ap.add_argument("--budget-clock", default="wall", choices=CLOCKS,
                    help="the clock of --budget-hours: wall time, or the training process's CPU time (budget.py)")
    ap.add_argument("--ckpt-minutes", type=float, default=0.0,
                    help="also checkpoint every this many minutes of wall time (0: by steps only)")
    ap.add_argument("--bf16", action="store_true",
                    help="mixed precision: forward under bfloat16 autocast (fp32 weights and optimizer)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    out = train(parse_args(argv))
    print(f"trained steps {out['start_step']}..{out['steps']} in {out['wall_s']:.0f}s -> {out['model_dir']}")


if __name__ == "__main__":
    main()
