"""Training of the fixture model shipped in `vlm_prune/fixture_model/` (a tool, not part of the
runtime package: nothing under `vlm_prune/` imports it; `vlm_prune.fixture` holds `load()` and
`evaluate()`). What the model is, its lineage and the commands that produced each version:
`vlm_prune/fixture_model/README.md` (the model card).

    python tools/train_fixture.py train [--out DIR] [--seed S] ...      # or: python -m tools.train_fixture
    python tools/train_fixture.py eval [--path DIR] [--n N]             # = python -m vlm_prune.fixture eval

Training (`train`, CPU, seeded, single-threaded) is staged:

- Stage V, the vision tower alone, with auxiliary heads that are thrown away afterwards: the
  pooled [CLS] output predicts which of the 18 colour-shape classes are present (a stand-in for
  CLIP pretraining; it makes [CLS] attention object-centred, as in real CLIP), and every layer -2
  patch predicts background / the class of the object covering it, its own row and column and its
  3x3 cell (so position stays readable in the features the LLM sees).
- Stage G (optional, `g_steps`): the relpos grounding targets alone (`_grounding_step`).
- Stage L, vision tower frozen, projector + Llama: each image gets several questions, packed
  into one sequence whose question blocks see the image but not each other (a block attention
  mask and position ids restarting after the image), which is exactly the single-question
  test-time layout; loss on each answer token; object-count curriculum; question types that
  lag on the validation split are sampled more often; optional dense answer loss (`dense`),
  grounding targets (`ground`) and a position-keeping loss on the projected tokens (`pos_aux`),
  see `_language_step`.

The code is the one that trained the shipped checkpoint (moved here from `vlm_prune/fixture.py`
unchanged; the same arguments give the same weights).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlm_prune.evals import synthetic_vqa as sv
from vlm_prune.fixture import DEFAULT_PATH, evaluate, load, print_evaluation

SIDE = sv.IMAGE_SIZE // sv.PATCH  # 12 patches per side
N_PATCHES = SIDE**2  # 144
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
QMAX = 14  # longest question + "answer :" (relpos: 12 + 2 words)


# ----------------------------------------------------------------------------- building


def build_processor(tokenizer=None):
    """LlavaProcessor: Pillow CLIP image processor at 168 px + the benchmark's WordLevel tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": sv.IMAGE_SIZE}, crop_size={"height": sv.IMAGE_SIZE, "width": sv.IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or sv.build_tokenizer(),
        patch_size=sv.PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's [CLS]
    )


def build_config(tokenizer=None, text_layers: int = 3):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = tokenizer or sv.build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=sv.IMAGE_SIZE, patch_size=sv.PATCH, projection_dim=128, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tok.convert_tokens_to_ids(sv.IMAGE_TOKEN),
        image_seq_length=N_PATCHES, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_model(seed: int = 0, text_layers: int = 3):
    """A freshly initialised (untrained) fixture LlavaForConditionalGeneration."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(build_config(text_layers=text_layers))



def pixel_values(images) -> torch.Tensor:
    """What the processor gives for 168x168 RGB images (no resize/crop needed), without PIL work."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))




# ----------------------------------------------------------------------------- training


class _VisionHeads(nn.Module):
    """Stage-V auxiliary heads (not part of LLaVA, never saved)."""

    def __init__(self, d: int = 128):
        super().__init__()
        self.presence = nn.Linear(d, len(sv.CLASSES))
        self.norm = nn.LayerNorm(d)
        self.cls = nn.Linear(d, 1 + len(sv.CLASSES))
        self.row = nn.Linear(d, SIDE)
        self.col = nn.Linear(d, SIDE)
        self.cell = nn.Linear(d, sv.GRID * sv.GRID)


def _cosine(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _tower_features(model, images) -> torch.Tensor:
    """[B, 144, Dv]: the frozen tower's features the projector receives (layer -2, no [CLS])."""
    out = model.model.vision_tower(pixel_values(images), output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _update(opt, params, loss) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _position_targets():
    idx = torch.arange(N_PATCHES)
    row, col = idx // SIDE, idx % SIDE
    per_cell = SIDE // sv.GRID
    return row, col, (row // per_cell) * sv.GRID + (col // per_cell)


def _vision_step(model, heads, rng, batch: int):
    scenes = [sv.sample_scene(rng, (1, 4)) for _ in range(batch)]
    images = [sv.render(s, rng) for s in scenes]
    presence = torch.zeros(batch, len(sv.CLASSES))
    for b, s in enumerate(scenes):
        for o in s:
            presence[b, o.label] = 1
    labels = torch.from_numpy(np.stack([sv.patch_labels(s) for s in scenes]))
    out = model.model.vision_tower(pixel_values(images), output_hidden_states=True)
    patches = heads.norm(out.hidden_states[-2][:, 1:])
    row, col, cell = _position_targets()
    weight = torch.where(labels > 0, 3.0, 1.0)
    loss_cls = (F.cross_entropy(heads.cls(patches).transpose(1, 2), labels, reduction="none") * weight).sum() / weight.sum()
    loss_pres = F.binary_cross_entropy_with_logits(heads.presence(out.pooler_output), presence)
    loss_pos = sum(
        F.cross_entropy(head(patches).reshape(-1, head.out_features), t.repeat(batch))
        for head, t in ((heads.row, row), (heads.col, col), (heads.cell, cell))
    )
    loss = loss_cls + loss_pres + 0.5 * loss_pos
    with torch.no_grad():
        obj = labels > 0
        acc_obj = (heads.cls(patches).argmax(-1)[obj] == labels[obj]).float().mean().item()
        acc_pres = ((heads.presence(out.pooler_output) > 0).float() == presence).all(-1).float().mean().item()
    return loss, {"cls": loss_cls.item(), "pres": loss_pres.item(), "pos": loss_pos.item(),
                  "obj_patch_acc": acc_obj, "presence_exact": acc_pres}


def _block_layout(k: int):
    """Attention mask (L, L) bool and position ids (L,) for [<s>, 144 image, k blocks of QMAX]."""
    prefix = 1 + N_PATCHES
    length = prefix + k * QMAX
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:prefix, :prefix] = torch.tril(torch.ones(prefix, prefix, dtype=torch.bool))
    block = torch.tril(torch.ones(QMAX, QMAX, dtype=torch.bool))
    pos = torch.arange(length)
    for b in range(k):
        s = prefix + b * QMAX
        mask[s:s + QMAX, :prefix] = True
        mask[s:s + QMAX, s:s + QMAX] = block
        pos[s:s + QMAX] = torch.arange(prefix, prefix + QMAX)
    return mask, pos


_CONTENT_WORDS = set(sv.COLOR_NAMES) | set(sv.SHAPES) | set(sv.CELLS)


def _key_index(words) -> int:
    """Index of the question's last content word (colour / shape / cell), the word the answer
    hinges on: the cell of color_at / shape_at, the shape of color_of, the colour of count, ..."""
    return max(i for i, w in enumerate(words) if w in _CONTENT_WORDS)


def _language_step(model, rng, batch: int, k: int, n_objects, qweights, vocab, layout, dense: float = 0.0,
                   ground: float = 0.0, dense_qtypes=None, ground_target: str = "cell", pos_head=None, pos_aux: float = 0.0):
    """Loss of one stage-L batch: `batch` images, `k` questions each, packed in blocks.

    `dense` > 0 adds the answer loss, with that weight, at every position from the question's key
    word (`_key_index`) up to the one before the final ":" (denser supervision: the key-word token
    learns to look its answer up in the image in one hop; the final position keeps weight 1), in
    the question types `dense_qtypes` (default: all).
    `ground` > 0 adds grounding targets with that weight in relpos questions: the colour and shape
    words of the first object and the colour and shape words of the second predict that object's
    cell word (`ground_target="cell"`) or only its column, as the middle row's cell word
    (`"column"`: middle-left / center / middle-right); cells are not answer words, so the
    restricted prediction at the colon is unaffected.
    `pos_head` (a throwaway Linear(d, 2 * SIDE)) with `pos_aux` > 0 adds a loss that keeps each
    projected image token's own row and column linearly readable (the answer loss alone lets the
    projector drop them: the LLM can locate tokens by position id, but then cannot say where a
    colour is).
    """
    scenes = [sv.sample_scene(rng, n_objects) for _ in range(batch)]
    images = [sv.render(s, rng) for s in scenes]
    ids = torch.full((batch, k, QMAX), vocab["<pad>"], dtype=torch.long)
    last = torch.zeros(batch, k, dtype=torch.long)
    gold = torch.zeros(batch, k, dtype=torch.long)
    weight = torch.zeros(batch, k, QMAX)
    target = torch.zeros(batch, k, QMAX, dtype=torch.long)
    grounded = torch.zeros(batch, k, QMAX, dtype=torch.bool)
    qtypes = []
    for b, s in enumerate(scenes):
        # every qtype once (in random order), then extras weighted towards the lagging ones
        wanted = list(rng.permutation(sv.QTYPES)) + list(rng.choice(sv.QTYPES, size=max(0, k - len(sv.QTYPES)), p=qweights))
        j = 0
        for qt in wanted:
            if j == k:
                break
            qa = sv.ask(s, qt, rng)
            while qa is None:
                qt = sv.QTYPES[int(rng.choice(len(sv.QTYPES), p=qweights))]
                qa = sv.ask(s, qt, rng)
            words = (qa[0] + " answer :").split()
            ids[b, j, :len(words)] = torch.tensor([vocab[w] for w in words])
            last[b, j] = len(words) - 1
            gold[b, j] = vocab[qa[1]]
            target[b, j] = vocab[qa[1]]
            if dense > 0 and (dense_qtypes is None or qt in dense_qtypes):
                weight[b, j, _key_index(words):len(words) - 1] = dense
            if ground > 0 and qt == "relpos":  # is the c1 s1 left or right of the c2 s2 ?
                for i, token in _grounding_targets(s, words, ground_target, vocab):
                    target[b, j, i] = token
                    weight[b, j, i] = ground
                    grounded[b, j, i] = True
            qtypes.append(qt)
            j += 1
    mask, pos = layout
    lm = model.model.language_model
    feats = _tower_features(model, images)
    image_emb = model.model.multi_modal_projector(feats)
    pos_loss = None
    if pos_head is not None and pos_aux > 0:
        row, col, _ = _position_targets()
        out_rc = pos_head(image_emb).reshape(batch * N_PATCHES, 2, SIDE)
        pos_loss = (F.cross_entropy(out_rc[:, 0], row.repeat(batch))
                    + F.cross_entropy(out_rc[:, 1], col.repeat(batch)))
    embed = lm.get_input_embeddings()
    bos = embed(torch.full((batch, 1), vocab["<s>"], dtype=torch.long))
    text = embed(ids.reshape(batch, k * QMAX))
    h = lm(inputs_embeds=torch.cat([bos, image_emb, text], 1),
           attention_mask=mask[None, None].expand(batch, 1, -1, -1),
           position_ids=pos[None].expand(batch, -1)).last_hidden_state
    where = 1 + N_PATCHES + torch.arange(k)[None] * QMAX + last  # (batch, k)
    h_last = h[torch.arange(batch)[:, None], where]
    logits = model.lm_head(h_last)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1))
    acc = (logits.argmax(-1) == gold).float().mean().item()
    if dense > 0 or ground > 0:
        # answer loss at the earlier positions too (weights 0 outside key word .. last-but-one)
        all_logits = model.lm_head(h[:, 1 + N_PATCHES:])  # (batch, k*QMAX, vocab)
        ce = F.cross_entropy(all_logits.reshape(-1, all_logits.shape[-1]),
                             target.reshape(-1), reduction="none")
        w = weight.reshape(-1)
        loss = (loss * gold.numel() + (ce * w).sum()) / (gold.numel() + w.sum())
    if pos_loss is not None:
        loss = loss + pos_aux * pos_loss
    ground_acc = None
    if grounded.any():
        at = grounded.reshape(batch, k * QMAX)
        hit = all_logits.argmax(-1)[at] == target.reshape(batch, k * QMAX)[at]
        ground_acc = hit.float().mean().item()
    return loss, acc, ground_acc


def _object_words(words) -> list[tuple[int, str]]:
    """(index, colour) of each object word of a relpos question -- "is the c1 s1 left or right of
    the c2 s2 ?": c1 and s1 name the first object, c2 and s2 the second."""
    return [(2, words[2]), (3, words[2]), (9, words[9]), (10, words[9])]


def _grounding_targets(scene, words, target: str, vocab) -> list[tuple[int, int]]:
    """(index, target token id) for each object word of a relpos question about `scene`."""
    by_color = {o.color: o for o in scene}
    return [(i, vocab[_grounding_target(by_color[c], target)]) for i, c in _object_words(words)]


def _grounding_target(obj, target: str) -> str:
    """The cell word an object word learns to predict: its cell, or (`"column"`) the middle
    row's cell of its column (middle-left / center / middle-right)."""
    return sv.CELLS[sv.GRID + obj.col] if target == "column" else sv.CELLS[obj.cell]


def _grounding_step(model, rng, batch: int, vocab, target: str = "column"):
    """Loss of one stage-G batch: `batch` relpos questions (one per image, the single-question
    layout), loss only at their object words, which predict their object's column / cell.

    This is the lookup relpos needs (colour -> where), learned alone: mixed into stage L it stays
    at chance for 2,000 steps, alone it is learned in ~150-300 steps once the projected image
    tokens keep their positions (`pos_aux`)."""
    ids, targets, images = [], [], []
    while len(ids) < batch:
        scene = sv.sample_scene(rng, (2, 4))
        qa = sv.ask(scene, "relpos", rng)
        if qa is None:
            continue
        words = (qa[0] + " answer :").split()
        ids.append([vocab[w] for w in words])
        targets.append([token for _, token in _grounding_targets(scene, words, target, vocab)])
        images.append(sv.render(scene, rng))
    lm = model.model.language_model
    feats = _tower_features(model, images)
    embed = lm.get_input_embeddings()
    bos = embed(torch.full((batch, 1), vocab["<s>"], dtype=torch.long))
    h = lm(inputs_embeds=torch.cat([bos, model.model.multi_modal_projector(feats), embed(torch.tensor(ids))], 1)).last_hidden_state
    where = torch.tensor([i for i, _ in _object_words(words)]) + 1 + N_PATCHES
    logits = model.lm_head(h[:, where])
    targets = torch.tensor(targets)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, (logits.argmax(-1) == targets).float().mean().item()


def train(out_dir=None, seed: int = 0, v_steps: int = 1500, l_steps: int = 3000, batch: int = 32, l_batch: int = 16,
          questions_per_image: int = 12, lr: float = 1e-3, eval_every: int = 400, n_val: int = 600,
          n_test: int = 2400, text_layers: int = 3, threads: int = 1, init_from=None,
          init_parts: str = "vision", embed_std: float | None = None, dense: float = 0.0,
          proj_scale: float | None = None, ground: float = 0.0, dense_qtypes=None, ground_target: str = "cell",
          pos_aux: float = 0.0, g_steps: int = 0, l_stop: int | None = None, log=print):
    """Train the fixture from scratch on CPU and save it (model + processor + metrics.json) to out_dir.

    Fresh images every step (seeded numpy generators), torch seeded, `threads` torch threads.
    `init_from` (a saved fixture folder) skips stage V and starts from its vision tower
    (`init_parts="vision"`) or from all its weights (`"all"`: continue stage L, no curriculum).
    After saving, the model is reloaded from disk and scored on the test split (`n_test` items,
    the split's default seed); that result goes to metrics.json. `embed_std` re-initialises the
    text embeddings with that standard deviation (the projected image tokens have norm ~14, the
    default-initialised text embeddings ~0.4). `dense`: see `_language_step`. `proj_scale`
    multiplies the projector's initial output layer (image tokens start nearer the text norm).
    `pos_aux`, `ground` / `ground_target`: see `_language_step`; `g_steps` runs stage G
    (`_grounding_step`) before stage L.
    `l_stop` (experiments) stops stage L after that many steps of the `l_steps` schedule and
    returns the history without saving.
    """
    torch.set_num_threads(threads)
    out_dir = Path(out_dir or DEFAULT_PATH)
    t0 = time.time()
    processor = build_processor()
    vocab = sv.vocabulary()
    model = build_model(seed, text_layers)
    model.train()
    val = sv.make_split("validation", n_val)
    history = {"stage_v": [], "stage_g": [], "stage_l": []}

    if init_from is not None:
        from transformers import LlavaForConditionalGeneration

        src = LlavaForConditionalGeneration.from_pretrained(str(init_from))
        if init_parts == "all":
            model.load_state_dict(src.state_dict())
        else:
            model.model.vision_tower.load_state_dict(src.model.vision_tower.state_dict())
        v_steps = 0
        del src

    # ---- stage V: vision tower + auxiliary heads
    torch.manual_seed(seed + 1)
    heads = _VisionHeads(model.config.vision_config.hidden_size)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 1])
    for step in range(v_steps):
        for g in opt.param_groups:
            g["lr"] = _cosine(step, v_steps, 100, lr)
        loss, stats = _vision_step(model, heads, rng, batch)
        _update(opt, params, loss)
        if step % 50 == 0 or step == v_steps - 1:
            stats = {k: round(v, 4) for k, v in stats.items()}
            history["stage_v"].append({"step": step, "loss": round(loss.item(), 4), **stats})
            log(f"[V {step:5d}] loss {loss.item():.4f} {stats} ({time.time() - t0:.0f}s)", flush=True)
    del heads, opt
    t_v = time.time() - t0

    if embed_std is not None:
        torch.manual_seed(seed + 2)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)

    if proj_scale is not None:
        with torch.no_grad():
            model.model.multi_modal_projector.linear_2.weight.mul_(proj_scale)
            model.model.multi_modal_projector.linear_2.bias.mul_(proj_scale)

    # ---- stage G (optional): relpos object words -> where their object is, alone
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    model.model.vision_tower.eval()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    if g_steps:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        rng = np.random.default_rng([seed, 3])
        model.model.multi_modal_projector.train()
        model.model.language_model.train()
        run_acc = []
        for step in range(g_steps):
            loss, acc = _grounding_step(model, rng, batch, vocab, ground_target)
            _update(opt, params, loss)
            run_acc.append(acc)
            if step % 50 == 49 or step == g_steps - 1:
                history["stage_g"].append({"step": step + 1, "loss": round(loss.item(), 4), "acc": round(float(np.mean(run_acc)), 4)})
                log(f"[G {step + 1:5d}] loss {loss.item():.4f} grounding acc {np.mean(run_acc):.3f} ({time.time() - t0:.0f}s)", flush=True)
                run_acc = []

    # ---- stage L: projector + Llama, vision frozen
    pos_head = None
    if pos_aux > 0:
        pos_head = nn.Linear(model.config.text_config.hidden_size, 2 * SIDE)
        params += list(pos_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 2])
    torch.manual_seed(seed + 2)
    layout = _block_layout(questions_per_image)
    qweights = np.full(len(sv.QTYPES), 1 / len(sv.QTYPES))
    stages = [(0.0, (1, 2)), (0.1, (1, 3)), (0.25, (1, 4)), (0.45, (2, 4))]
    if init_from is not None and init_parts == "all":
        stages = [(0.0, (2, 4))]
    best = None
    run_loss, run_acc, run_ground = [], [], []
    for step in range(l_steps):
        n_objects = [r for frac, r in stages if step >= frac * l_steps][-1]
        for g in opt.param_groups:
            g["lr"] = _cosine(step, l_steps, 100, lr)
        model.model.multi_modal_projector.train()
        model.model.language_model.train()
        if l_stop is not None and step >= l_stop:
            return {"history": history}
        loss, acc, ground_acc = _language_step(model, rng, l_batch, questions_per_image, n_objects, qweights, vocab, layout,
                                   dense, ground, dense_qtypes, ground_target, pos_head, pos_aux)
        _update(opt, params, loss)
        run_loss.append(loss.item())
        run_acc.append(acc)
        if ground_acc is not None:
            run_ground.append(ground_acc)
        if step % 50 == 0:
            grounding = f"ground_acc {np.mean(run_ground):.3f} " if run_ground else ""
            log(f"[L {step:5d}] loss {np.mean(run_loss):.4f} train_acc {np.mean(run_acc):.3f} {grounding}"
                f"objects {n_objects} ({time.time() - t0:.0f}s)", flush=True)
            run_loss, run_acc, run_ground = [], [], []
        if (step + 1) % eval_every == 0 or step == l_steps - 1:
            res = evaluate(model, processor, val)
            lag = np.array([1.0 - res["per_qtype"][q] for q in sv.QTYPES]) + 0.05
            qweights = lag / lag.sum()
            history["stage_l"].append({"step": step + 1, "val": res, "time_s": round(time.time() - t0)})
            log(f"[L {step + 1:5d}] VAL acc {res['accuracy']:.4f} "
                f"{ {q: round(a, 3) for q, a in res['per_qtype'].items()} } ({time.time() - t0:.0f}s)", flush=True)
    t_total = time.time() - t0

    # ---- save, reload, test
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

    save_for_vllm(model, processor, out_dir)  # a layout both transformers and vLLM load
    model2, processor2 = load(out_dir)
    test = sv.make_split("test", n_test)
    res = evaluate(model2, processor2, test)
    res.pop("correct")
    metrics = {
        "split": "test", "seed": sv.SPLIT_SEEDS["test"], **res,
        "prediction": "argmax of the last-position logits restricted to the answer words ('accuracy'); "
                      "'accuracy_argmax' is the plain argmax over the vocabulary",
        "training": {"seed": seed, "init_from": str(init_from) if init_from else None, "init_parts": init_parts, "v_steps": v_steps, "l_steps": l_steps, "batch": batch, "l_batch": l_batch,
                     "questions_per_image": questions_per_image, "lr": lr, "text_layers": text_layers,
                     "embed_std": embed_std, "dense": dense, "dense_qtypes": list(dense_qtypes or sv.QTYPES),
                     "ground": ground, "ground_target": ground_target, "pos_aux": pos_aux, "g_steps": g_steps, "proj_scale": proj_scale,
                     "threads": threads, "stage_v_s": round(t_v), "total_s": round(t_total),
                     "validation": ({k: v for k, v in history["stage_l"][-1]["val"].items() if k != "correct"}
                                    if history["stage_l"] else None)},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"TEST acc {res['accuracy']:.4f} (argmax {res['accuracy_argmax']:.4f}) "
        f"{ {q: round(a, 3) for q, a in res['per_qtype'].items()} } n={res['n']} "
        f"train {t_total:.0f}s total {time.time() - t0:.0f}s", flush=True)
    return metrics




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/train_fixture.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train (from scratch, or from --init-from) and save (default: the shipped folder)")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--v-steps", type=int, default=1500)
    p.add_argument("--l-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--questions", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-from", default=None, help="a saved fixture folder: skip stage V, start from it")
    p.add_argument("--init-parts", default="vision", choices=["vision", "all"])
    p.add_argument("--embed-std", type=float, default=None, help="re-initialise the text embeddings with this std")
    p.add_argument("--dense", type=float, default=0.0, help="answer-loss weight from the key word to the colon")
    p.add_argument("--proj-scale", type=float, default=None, help="scale the projector's initial output layer")
    p.add_argument("--dense-qtypes", default=None, help="comma-separated qtypes that get --dense (default all)")
    p.add_argument("--ground", type=float, default=0.0, help="relpos grounding-target weight (object words -> cell)")
    p.add_argument("--ground-target", default="cell", choices=["cell", "column"],
                   help="what --ground's object words predict: the object's cell, or only its column")
    p.add_argument("--pos-aux", type=float, default=0.0,
                   help="weight of a loss keeping row/column readable in the projected image tokens")
    p.add_argument("--g-steps", type=int, default=0,
                   help="stage G steps before stage L: relpos object words learn where their object is")
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--l-stop", type=int, default=None, help="experiments: stop stage L early, save nothing")
    e = sub.add_parser("eval", help="score a saved fixture on the test split (as python -m vlm_prune.fixture eval)")
    e.add_argument("--path", default=None)
    e.add_argument("--n", type=int, default=2400)
    e.add_argument("--split", default="test")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        train(args.out, seed=args.seed, v_steps=args.v_steps, l_steps=args.l_steps,
              eval_every=args.eval_every, questions_per_image=args.questions, threads=args.threads,
              lr=args.lr, init_from=args.init_from, init_parts=args.init_parts, embed_std=args.embed_std,
              dense=args.dense, ground=args.ground, ground_target=args.ground_target,
              pos_aux=args.pos_aux, g_steps=args.g_steps,
              dense_qtypes=args.dense_qtypes.split(",") if args.dense_qtypes else None, proj_scale=args.proj_scale, text_layers=args.text_layers, l_stop=args.l_stop)
    else:
        print_evaluation(args.path, args.split, args.n)


if __name__ == "__main__":
    main()
