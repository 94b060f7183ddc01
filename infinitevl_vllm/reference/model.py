"""The whole InfiniteVL model in plain PyTorch, one sequence at a time.

This is the numerical truth the vLLM model is tested against: clarity over speed.  Parameter
names equal the released checkpoint's (``model.*`` text decoder, ``visual.*`` vision tower,
LM head tied to the embeddings), so ``load_state_dict`` takes a checkpoint as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from infinitevl_kernels import mrope_cos_sin
from infinitevl_kernels.layout import rope_of
from torch import nn

from ..config import InfiniteVLConfig, is_swa_layer
from .layers import DecoderLayer, GDNState, RMSNorm, SWAState
from .positions import mrope_positions
from .vision import VisionTower


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, is_swa_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class SequenceState:
    """Everything a sequence carries between calls: constant size once past the window."""

    layers: list = field(default_factory=list)
    num_tokens: int = 0
    rope_delta: int = 0


@dataclass
class MultimodalInputs:
    input_ids: torch.Tensor  # [T]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: list[float] | None = None

    @classmethod
    def from_processor(cls, batch) -> MultimodalInputs:
        def get(k):
            return batch[k] if k in batch else None

        sec = get("second_per_grid_ts")
        return cls(
            input_ids=batch["input_ids"][0],
            pixel_values=get("pixel_values"),
            image_grid_thw=get("image_grid_thw"),
            pixel_values_videos=get("pixel_values_videos"),
            video_grid_thw=get("video_grid_thw"),
            second_per_grid_ts=None if sec is None else [float(s) for s in torch.as_tensor(sec).flatten()],
        )


class InfiniteVLReference(nn.Module):
    def __init__(self, config: InfiniteVLConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text_config
        self.visual = VisionTower(config.vision_config)
        self.model = TextModel(config.text_config)

    # -- inputs -------------------------------------------------------------------------
    def embed(self, mm: MultimodalInputs) -> torch.Tensor:
        x = self.model.embed_tokens(mm.input_ids)
        for pixels, grid, token in (
            (mm.pixel_values, mm.image_grid_thw, self.config.image_token_id),
            (mm.pixel_values_videos, mm.video_grid_thw, self.config.video_token_id),
        ):
            if pixels is None:
                continue
            feats = self.visual(pixels.to(x.dtype), grid).to(x.dtype)
            where = mm.input_ids == token
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(f"{int(where.sum())} placeholder tokens for {feats.shape[0]} vision features")
            x = x.clone()
            x[where] = feats
        return x

    def positions(self, mm: MultimodalInputs) -> tuple[torch.Tensor, int]:
        cfg, vcfg = self.config, self.config.vision_config
        return mrope_positions(
            mm.input_ids,
            mm.image_grid_thw,
            mm.video_grid_thw,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
            spatial_merge_size=vcfg.spatial_merge_size,
            tokens_per_second=vcfg.tokens_per_second,
            second_per_grid_ts=mm.second_per_grid_ts,
        )

    # -- decoder ------------------------------------------------------------------------
    def new_state(self) -> SequenceState:
        return SequenceState(layers=[SWAState() if layer.is_swa else GDNState() for layer in self.model.layers])

    def decode_hidden(
        self, x: torch.Tensor, positions: torch.Tensor, state: SequenceState, recurrent: bool = False
    ) -> torch.Tensor:
        """Run the decoder over embeddings x [T, hidden] at M-RoPE positions [3, T], updating state."""
        tc = self.text_config
        cos, sin = mrope_cos_sin(positions, tc.head_dim, *rope_of(tc))
        token_pos = torch.arange(state.num_tokens, state.num_tokens + x.shape[0])
        for layer, layer_state in zip(self.model.layers, state.layers):
            x = layer(x, cos, sin, token_pos, layer_state, recurrent=recurrent)
        state.num_tokens += x.shape[0]
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.model.embed_tokens.weight.t()

    @torch.no_grad()
    def prefill(self, mm: MultimodalInputs, state: SequenceState | None = None, recurrent: bool = False):
        """Returns (logits [T, vocab], state)."""
        state = state or self.new_state()
        positions, state.rope_delta = self.positions(mm)
        hidden = self.decode_hidden(self.embed(mm), positions, state, recurrent=recurrent)
        return self.logits(hidden), state

    @torch.no_grad()
    def step(self, token: int, state: SequenceState) -> torch.Tensor:
        """One decode step: logits [vocab] for the token after `token`."""
        pos = torch.full((3, 1), state.num_tokens + state.rope_delta, dtype=torch.long)
        x = self.model.embed_tokens(torch.tensor([token]))
        return self.logits(self.decode_hidden(x, pos, state, recurrent=True))[0]

    @torch.no_grad()
    def generate(self, mm: MultimodalInputs, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding."""
        logits, state = self.prefill(mm)
        out = [int(logits[-1].argmax())]
        while len(out) < max_new_tokens and out[-1] != eos_token_id:
            out.append(int(self.step(out[-1], state).argmax()))
        return out

    @torch.no_grad()
    def prompt_logprobs(self, mm: MultimodalInputs) -> torch.Tensor:
        """log p(token_t | tokens_<t) for t >= 1: [T-1]."""
        logits, _ = self.prefill(mm)
        lp = torch.log_softmax(logits[:-1].double(), -1)
        return lp.gather(-1, mm.input_ids[1:, None]).squeeze(-1)
