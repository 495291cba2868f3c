"""The optimizer: AdamW for everything, or Muon for the hidden matrices and AdamW for the rest.

Muon (Jordan et al. 2024; what modded-nanogpt and nanochat train with) replaces each 2-D hidden weight's
momentum update by its nearest semi-orthogonal matrix (a few Newton–Schulz iterations), so every direction of
the matrix moves at the same rate. It is for matrices that map hidden states to hidden states: the embedding,
the output head and the norm gains keep AdamW (Muon's authors and nanochat do the same: the embedding is a
lookup, not a linear map of its input, and the head's rows are per-token scores).

torch.optim.Muon (since torch 2.9) is the implementation, with adjust_lr_fn="match_rms_adamw" (Liu et al. 2025,
"Muon is Scalable for LLM Training"): each matrix's update is scaled to the RMS an AdamW update has, so one
learning rate and one schedule serve both optimizers, and a run switches optimizer without re-tuning from zero.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "muon")
MUON_MOMENTUM = 0.95  # Muon's default, and nanochat's
HIDDEN_BLOCKS = ("layers.", "encoder.layer.")  # where the blocks' matrices are: the decoder's, the encoder's


class Optimizers:
    """Several optimizers stepped as one, over disjoint parameters: the interface the training loop and the
    checkpoint use (`param_groups`, `step`, `zero_grad`, `state_dict`, `load_state_dict`).

    state_dict numbers the parameters across all optimizers in order, the way a single optimizer would, so a
    checkpoint of it has the same shape as one of plain AdamW (optimizer.safetensors keys "PID.NAME").
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + pid: s for pid, s in sd["state"].items()})
            groups += [{**g, "params": [offset + p for p in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            sd["state"] = {pid - offset: s for pid, s in state_dict["state"].items() if offset <= pid < offset + n}
            opt.load_state_dict(sd)
            offset += n


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer | Optimizers:
    """The optimizer over `model`'s trainable parameters, as `cfg` (a TrainConfig: optimizer, lr, weight_decay,
    beta1, beta2) says. Weight decay applies to matrices only (not to norm gains); "muon" takes the 2-D weights
    inside the transformer blocks (a decoder's `layers.*`, an encoder's `encoder.layer.*`: attention and MLP; an
    encoder's embeddings, embedding LayerNorm and MLM head stay on AdamW)."""
    optimizer, lr, weight_decay = cfg.optimizer, cfg.lr, cfg.weight_decay
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in trainable
              if optimizer == "muon" and name.startswith(HIDDEN_BLOCKS) and p.dim() == 2]
    taken = {id(p) for p in hidden}
    rest = [p for _, p in trainable if id(p) not in taken]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    # fused AdamW on CPU and CUDA alike (torch >= 2.4); empty groups are fine
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)
    if not hidden:
        return adamw
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw)
