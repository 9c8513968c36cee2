"""`cdpruner`: CDPruner -- keep the subset of maximal conditional diversity (a conditional DPP).

The released rules (github Theia-4869/CDPruner @ 9541616, the LLaVA code the paper's numbers
come from: `llava/model/llava_arch.py` `encode_images` (kernel and MAP inference),
`llava/model/multimodal_encoder/clip_encoder.py` `forward` / `load_text_tower` (the embeddings
of the relevance), `llava/model/language_model/llava_llama.py` (the budget `visual_token_num`)),
per image of N tokens and a budget of k:

1. Similarity S: the cosine similarity of the visual tokens AFTER the projector (the LLM-space
   features), in float32: S = U U^T with U the L2-normalised tokens.
2. Relevance: the instruction is embedded by CLIP's text tower (its projected pooled output, one
   vector per 77-token segment); each visual token by CLIP's own head (post-layernorm + visual
   projection of the feature-layer patch token). x_i = -mean over segments of cos(token_i, text)
   -- the release negates the cosine, a CLIP-specific inversion its authors report (their issues
   #9, #14) -- then min-max normalised: r = (x - min x + 1e-6) / (max x - min x).
3. Kernel L = diag(r) S diag(r), i.e. L_ij = r_i S_ij r_j. (A commented-out variant raises the
   relevance's weight: r -> exp(alpha r), alpha = theta / (2 (1 - theta)); off in the release.)
4. Greedy MAP inference of the DPP (fast greedy MAP, Chen et al. 2018): k times, add the token j
   of largest residual d_j = det(L_{Y+j}) / det(L_Y), maintained by an incremental Cholesky
   factor: e = (L_j - C_j^T C) / sqrt(d_j), d <- d - e^2 -- O(N k^2) per image, never an
   N x N decomposition. The first pick is the most relevant token (S_ii = 1; set exactly here,
   where the release's float32 product leaves it at 1 +- rounding). Ties go to the lower index
   (torch.argmax).
5. The kept tokens go to the LLM in raster order.
LLaVA-NeXT: the base image and every crop each keep k (`budget="per_crop"`, the release's
`visual_token_num` per crop); the `image_newline` tokens stay on top.

Departures, each forced or a named option:
- The relevance's embeddings: LLaVA / Qwen checkpoints ship neither CLIP's text tower nor its
  visual projection (and Qwen's tower was retrained), so the instruction is the mean of the
  LLM's own input embeddings of the instruction (the prompt's text after its last image; the
  `question` signal, as `text_recovery`), compared by cosine with the LLM-space tokens -- the
  space of S -- and negated as the release does (`relevance="negated"`, the default; on the
  fixture it keeps 86.8% accuracy at 16 tokens against 58.2% with +cos). `relevance="cosine"` is
  the paper's sign (a named departure), `relevance="none"` drops the condition (r = 1: a DPP on S
  alone, the paper's ablation without the instruction).
- `theta` (default None = the release): a number in (0, 1) switches on its commented-out
  exponential weighting, r -> exp(r * theta / (2 (1 - theta))).
- Normalisation scope: the release min-maxes over the whole vision batch (one image on
  LLaVA-1.5, all crops of the image on LLaVA-NeXT); here over each region that `reduce` sees (an
  image, a crop, a frame). When all x are equal (max = min) the release divides by zero; here
  r = 1 then.
- Rank exhaustion: when a token's residual is no longer positive (k above the kernel's rank:
  duplicate tokens, or more tokens than feature dimensions) the release takes the square root of
  a non-positive number and its picks turn to NaN; here, once the largest residual is <= 1e-6 of
  the largest diagonal entry, the remaining picks go by relevance (the diagonal of L), ties to
  the lower index, without further updates. Well-conditioned inputs are unaffected.
- The release runs batch size 1; here the greedy runs batched over the I images of a group,
  each with its own question (same picks as alone). vLLM's image encoder never sees the
  question, so `cdpruner` runs on transformers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Option, choice, is_number
from ..registry import register_method
from .base import Reduction, VisionMethod, gather_tokens

EXHAUSTED = 1e-6  # a residual at most this share of the largest diagonal entry counts as none


def _check_theta(name, value):
    if value is None:
        return None
    if not is_number(value) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be None or a number in (0, 1)")
    return float(value)


def relevance(features: torch.Tensor, question: torch.Tensor, mode: str = "cosine",
              theta: float | None = None) -> torch.Tensor:
    """features [I, N, D], question [I, D] -> r [I, N] (float32): cosine (negated for "negated"),
    min-max normalised per row as the release does ((x - min + 1e-6) / (max - min); r = 1 when
    the row is constant); "none": all ones. theta: r -> exp(r theta / (2 (1 - theta)))."""
    n_images, n_tokens = features.shape[:2]
    if mode == "none":
        r = features.new_ones(n_images, n_tokens, dtype=torch.float32)
    else:
        x = F.cosine_similarity(features.float(), question.float().to(features.device)[:, None, :], dim=-1)
        if mode == "negated":
            x = -x
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        spread = high - low
        r = torch.where(spread > 0, (x - low + 1e-6) / spread.clamp(min=torch.finfo(x.dtype).tiny),
                        torch.ones_like(x))
    if theta is not None:
        r = torch.exp(r * (theta / (2 * (1 - theta))))
    return r


def conditional_kernel(features: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the tokens: [I, N, N] float32."""
    unit = F.normalize(features.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    similarity.diagonal(dim1=1, dim2=2).fill_(1.0)  # cos(t, t) = 1 exactly: no rounding ties
    return r[:, :, None] * similarity * r[:, None, :]


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel [I, N, N] (symmetric PSD), batched over I: [I, k] indices,
    increasing. Each step adds the token of largest residual det(L_{Y+j}) / det(L_Y), kept up to
    date by an incremental Cholesky factor (O(N k^2) per image). Once the largest residual is at
    most EXHAUSTED of the largest diagonal entry, the rest go by the diagonal (see the module
    docstring). Never reads a device value."""
    n_images, n_tokens, _ = kernel.shape
    rows = torch.arange(n_images, device=kernel.device)
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2)
    residual = diagonal.clone()
    floor = diagonal.amax(-1) * EXHAUSTED  # [I]
    factor = kernel.new_zeros(n_images, k, n_tokens)  # row t: the Cholesky column of the t-th pick
    picked = torch.zeros(n_images, n_tokens, dtype=torch.bool, device=kernel.device)
    chosen = []
    for t in range(k):
        best, pick = residual.max(-1)
        exhausted = ~(best > floor)  # NaN counts as exhausted too
        fallback = diagonal.masked_fill(picked, float("-inf")).argmax(-1)
        pick = torch.where(exhausted, fallback, pick)
        gain = residual[rows, pick]
        # e = (L[pick] - C[:, pick]^T C) / sqrt(d_pick)
        projection = torch.bmm(factor[rows, :t, pick][:, None, :], factor[:, :t]).squeeze(1)
        e = (kernel[rows, pick] - projection) / gain.clamp(min=torch.finfo(kernel.dtype).tiny).sqrt()[:, None]
        e = torch.where(exhausted[:, None], torch.zeros_like(e), e)
        factor[:, t] = e
        picked[rows, pick] = True
        residual = (residual - e * e).masked_fill(picked, float("-inf"))
        chosen.append(pick)
    return torch.stack(chosen, 1).sort(dim=-1).values


@register_method
class CDPruner(VisionMethod):
    name = "cdpruner"
    needs = frozenset({"question"})
    paper = ("Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs "
             "(CDPruner, NeurIPS 2025, arXiv 2506.10967)")
    release = ("github Theia-4869/CDPruner @ 9541616, llava/model/llava_arch.py encode_images, "
               "llava/model/multimodal_encoder/clip_encoder.py forward")
    # LLaVA-NeXT: the release keeps visual_token_num tokens of the base image and of every crop
    default_budget = "per_crop"
    options = {
        "relevance": Option("negated", choice("negated", "cosine", "none"),
                            "'negated': r from -cos(token, instruction) (the release); 'cosine': the paper's "
                            "+cos; 'none': r = 1, a DPP on the similarity alone"),
        "theta": Option(None, _check_theta, "None (the release): L = diag(r) S diag(r); a number in (0, 1): "
                                            "r -> exp(r theta / (2 (1 - theta))), the release's commented-out variant"),
    }

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        n_images, n_tokens = features.shape[:2]
        if k >= n_tokens:
            index = torch.arange(n_tokens, device=features.device).expand(n_images, -1)
            return Reduction(features, index)
        question = signals.get("question")
        if question is None and options["relevance"] != "none":
            raise ValueError("cdpruner needs the instruction ('question' signal) unless relevance='none'")
        r = relevance(features, question, options["relevance"], options["theta"])
        return gather_tokens(features, greedy_map(conditional_kernel(features, r), k))

