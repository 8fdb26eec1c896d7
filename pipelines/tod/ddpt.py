"""A description-conditioned dialogue policy in the spirit of DDPT (Geishauser et al. 2022, "Dynamic Dialogue
Policy for Continual Reinforcement Learning").

Every system act is described in words by its intent and slot, every state feature by its kind ("user inform",
"pending", "matches 2", ...) and slot. A small word-embedding encoder trained here turns each description into a
vector (mean of word embeddings per part, then a linear map of the parts). The state is the set of its active
features; each act attends over them (query: the act, keys and values: the active features) and its logit is
read from the act's embedding, its attention context and a summary of the whole state. Attention scores get two
learned biases for "same domain" and "same slot", the role DDPT's domain gate plays; the domain enters only there
(a domain's name embedded as a word is an untrained vector in a new domain: that version acted at random there).
Nothing in the network is indexed by a fixed act or feature position, so the same weights act in a domain they
were never trained on, given its slots' descriptions.

`policy.encoder`, a local `transformers` model directory, replaces the trained word embeddings with that model's
frozen, mean-pooled encoding of each description part (DDPT encodes its descriptions with a frozen RoBERTa).

Descriptions default to the names themselves ("price range", "request"); a JSON file
`{"intents": {intent: text}, "slots": {domain: {slot: text}}}` gives richer ones and must describe every intent
and slot the environment uses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.tod.env import ActionSpace, StateVectoriser
from pipelines.tod.policy import MLPPolicy, PolicyOutput
from workbench.errors import WorkbenchError, first_line

PARTS = 2  # a description is (intent or feature kind, slot); the domain enters through the match biases
# Initial logit of every act: p = 0.12, a few acts per turn rather than half of them, so PPO from scratch starts
# from short system turns (a first trial with a zero bias left 2 of 3 domains at 0 success after 10 iterations each;
# with -2 either policy reaches 0.8-1.0 greedy success on restaurant in 40).
INITIAL_ACT_LOGIT = -2.0


def load_descriptions(path: str | Path | None, actions: ActionSpace, vectoriser: StateVectoriser) -> dict[str, Any]:
    """The description file, checked against the acts and features in use; None: every name describes itself."""
    domains = set(vectoriser.domains)
    intents = {i for i, _, _ in actions.acts} | {"nooffer", "nobook"}
    slots = {(d, s) for _, d, s in actions.acts if s} | {(n[2], n[3]) for n in vectoriser.names if n[0] == "user"}
    if path is None:
        return {
            "intents": {i: i for i in intents},
            "slots": {d: {s: s for dd, s in slots if dd == d} for d in domains},
        }
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"policy.descriptions: {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkbenchError(f"{path}: cannot read descriptions: {exc}") from None
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{path}: expected a JSON object with intents and slots")
    if not isinstance(raw.get("intents"), dict):
        raise WorkbenchError(f"{path}: intents: missing or not a mapping")
    for name in sorted(intents):
        if not isinstance(raw["intents"].get(name), str) or not raw["intents"][name].strip():
            raise WorkbenchError(f"{path}: intents.{name}: missing description")
    if not isinstance(raw.get("slots"), dict):
        raise WorkbenchError(f"{path}: slots: missing or not a mapping")
    for domain, slot in sorted(slots):
        text = raw["slots"].get(domain, {}).get(slot) if isinstance(raw["slots"].get(domain), dict) else None
        if not isinstance(text, str) or not text.strip():
            raise WorkbenchError(f"{path}: slots.{domain}.{slot}: missing description")
    return raw


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class DescribedSpace:
    """The acts and state features as word-id descriptions `[n, PARTS, max_words]` (0 pads), plus which act
    and feature share a domain or a slot."""

    def __init__(self, actions: ActionSpace, vectoriser: StateVectoriser, descriptions: Mapping[str, Any]) -> None:
        intents, slots = descriptions["intents"], descriptions["slots"]

        def slot_text(domain: str, slot: str) -> str:
            return slots.get(domain, {}).get(slot, slot) if slot else ""

        acts = [(intents[i], slot_text(d, s)) for i, d, s in actions.acts]
        act_keys = [(d, s) for _, d, s in actions.acts]
        features, feature_keys = [], []
        for name in vectoriser.names:
            if name[0] in ("user", "system"):
                kind, domain, slot = f"{name[0]} {intents.get(name[1], name[1])}", name[2], name[3]
            elif name[0] == "matches":
                kind, domain, slot = f"matches {name[2]}", name[1], ""
            else:
                kind, domain, slot = name[0], name[1], name[2] if len(name) > 2 else ""
            features.append((kind, slot_text(domain, slot)))
            feature_keys.append((domain, slot))
        self.act_texts, self.feature_texts = acts, features
        vocabulary = sorted({w for text in (*acts, *features) for part in text for w in _words(part)})
        self.vocabulary = {w: i + 1 for i, w in enumerate(vocabulary)}
        self.act_words = self._encode(acts)
        self.feature_words = self._encode(features)
        self.same_domain = torch.tensor([[float(a[0] == f[0]) for f in feature_keys] for a in act_keys])
        self.same_slot = torch.tensor([[float(bool(a[1]) and a[1] == f[1]) for f in feature_keys] for a in act_keys])

    def _encode(self, texts: Sequence[tuple[str, str]]) -> torch.Tensor:
        ids = [[[self.vocabulary[w] for w in _words(part)] for part in text] for text in texts]
        width = max(1, max(len(p) for t in ids for p in t))
        out = torch.zeros(len(ids), PARTS, width, dtype=torch.long)
        for i, text in enumerate(ids):
            for j, part in enumerate(text):
                out[i, j, : len(part)] = torch.tensor(part, dtype=torch.long)
        return out


def encode_descriptions(path: str, space: DescribedSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Every description part of the acts and features (`[n, PARTS, width]`) through a local `transformers` encoder,
    frozen: its last hidden states mean-pooled over the part's tokens (an empty part is zeros), computed once."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise WorkbenchError(f"policy.encoder: {path}: not a transformers model and tokenizer: {reason}") from None
    texts = sorted({part for text in (*space.act_texts, *space.feature_texts) for part in text if part})
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = dict(zip(texts, (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), strict=True))
    zero = torch.zeros(hidden.shape[-1])

    def stack(described: list[tuple[str, str]]) -> torch.Tensor:
        return torch.stack([torch.stack([pooled[p] if p else zero for p in text]) for text in described])

    return stack(space.act_texts), stack(space.feature_texts)


class DDPTPolicy(nn.Module):
    """Described state features -> state summary (layer_00) -> MLP (layer_01..) ; per act: attention over the
    active features, logit from [act, context, state]. Same call interface as `MLPPolicy`. With `encoded` (from
    `encode_descriptions`) the descriptions are the frozen encoder's vectors instead of trained word embeddings."""

    def __init__(
        self,
        space: DescribedSpace,
        hidden_size: int = 64,
        num_layers: int = 2,
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("act_words", space.act_words, persistent=False)
        self.register_buffer("feature_words", space.feature_words, persistent=False)
        self.register_buffer("same_domain", space.same_domain, persistent=False)
        self.register_buffer("same_slot", space.same_slot, persistent=False)
        d = hidden_size
        if encoded is None:
            self.words, width = nn.Embedding(len(space.vocabulary) + 1, d, padding_idx=0), d
        else:
            self.words, width = None, encoded[0].shape[-1]
            self.register_buffer("act_encoded", encoded[0], persistent=False)
            self.register_buffer("feature_encoded", encoded[1], persistent=False)
        self.act_proj = nn.Linear(PARTS * width, d)
        self.feature_proj = nn.Linear(PARTS * width, d)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.match_bias = nn.Parameter(torch.tensor([1.0, 1.0]))  # same domain, same slot
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(num_layers))
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))
        nn.init.constant_(self.head[-1].bias, INITIAL_ACT_LOGIT)

    def describe(self, words: torch.Tensor, encoded: torch.Tensor | None, proj: nn.Linear) -> torch.Tensor:
        """Per description part its encoder vector, or else its mean word embedding; the parts concatenated and
        projected: [n, d]."""
        if encoded is None:
            mask = (words > 0).float().unsqueeze(-1)
            encoded = (self.words(words) * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)
        return proj(encoded.flatten(1))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> PolicyOutput:
        x = input_ids.float()
        squeeze = x.dim() == 1
        x = x.unsqueeze(0) if squeeze else x
        flat = x.reshape(-1, x.shape[-1])  # probes come as [n, 1, features]
        acts = self.describe(self.act_words, getattr(self, "act_encoded", None), self.act_proj)  # [A, d]
        features = self.describe(self.feature_words, getattr(self, "feature_encoded", None), self.feature_proj)
        h = flat @ features / flat.sum(-1, keepdim=True).clamp(min=1.0)  # the state: mean of its active features
        hidden = [h]
        for layer in self.layers:
            h = F.relu(layer(h))
            hidden.append(h)
        # Scaled dot-product attention of each act over the active features (Vaswani et al. 2017, eq. 1).
        scores = self.query(acts) @ self.key(features).T / math.sqrt(acts.shape[-1])
        scores = scores + self.match_bias[0] * self.same_domain + self.match_bias[1] * self.same_slot
        scores = scores.unsqueeze(0).masked_fill(flat.unsqueeze(1) == 0, -1e9)  # [B, A, Fe]
        context = torch.softmax(scores, -1) @ self.value(features)  # [B, A, d]
        joint = torch.cat([acts.expand_as(context), context, h.unsqueeze(1).expand_as(context)], -1)
        logits = self.head(joint).squeeze(-1)
        logits = logits.reshape(*x.shape[:-1], -1)
        states = tuple(t.reshape(*x.shape[:-1], -1) for t in hidden)
        if squeeze:
            logits, states = logits[0], tuple(t[0] for t in states)
        return PolicyOutput(logits, states if output_hidden_states else None)

    greedy = MLPPolicy.greedy  # the same rule: every act with probability > 0.5
