"""`LanguageModel`: a Hugging Face causal LM, its tokenizer, and its sites."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saelab.lm.hooks import read_sites, spliced_final_hidden, spliced_logits
from saelab.lm.sites import Site, list_sites, resolve_site


@dataclass(frozen=True)
class Unembedding:
    """The LM head as a plain affine map, logits = h @ weight.T + bias, so that a caller can
    apply it a slice of the vocabulary at a time instead of building [tokens, vocab]."""

    weight: Tensor  # [vocab, d]
    bias: Tensor | None  # [vocab]


@dataclass
class LanguageModel:
    """A causal LM ready to be read and spliced at TransformerLens-named sites.

    `fingerprint` identifies the weights (sha256 of the files they came from, or of the
    tensors themselves for a model built in memory); activation stores record it so that a
    store can be matched to the model that made it.
    """

    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint_fn: Callable[[], str] | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _sites: dict[str, Site] = field(default_factory=dict, repr=False)
    _unembedding: Unembedding | None = field(default=None, repr=False)
    _probed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.hf_model.eval()
        self._sites = {s.name: s for s in list_sites(self.hf_model.config)}

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def bos_token_id(self) -> int:
        """The token every window starts with (EOS stands in for models without a BOS)."""
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if not isinstance(bos, int):  # None, or not one id
            raise ValueError(f"tokenizer of {self.name} has neither a BOS nor an EOS token")
        return int(bos)

    def sites(self) -> list[Site]:
        return list(self._sites.values())

    def site(self, name: str) -> Site:
        return self._sites[name] if name in self._sites else resolve_site(self.hf_model.config, name)

    def read(self, input_ids: Tensor, sites: Sequence[str],
             attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Activations [batch, pos, width] at each site, stopping the pass after the last."""
        resolved = [self.site(s) for s in sites]
        return read_sites(self.hf_model, resolved, input_ids.to(self.device),
                          None if attention_mask is None else attention_mask.to(self.device))

    def logits(self, input_ids: Tensor, splice: Mapping[str, Callable[[Tensor], Tensor | None]]
               | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits [batch, pos, vocab], with sites replaced by `splice[site](value)`."""
        splices = {self.site(name): fn for name, fn in (splice or {}).items()}
        return spliced_logits(self.hf_model, input_ids.to(self.device), splices,
                              None if attention_mask is None else attention_mask.to(self.device))

    def loss_gradient(self, input_ids: Tensor, site: str) -> Tensor:
        """d(summed next-token cross-entropy) / d(the site's value) at positions 1 .. T-1
        [batch, T - 1, width], the loss summed over the positions 1 .. T-2 a splice is scored
        on (BOS is neither replaced nor scored): the first-order effect on the loss of any
        change to the site's value, g . (x_hat - x)."""
        leaf: dict[str, Tensor] = {}

        def open_up(x: Tensor) -> Tensor:
            leaf["v"] = x[:, 1:].detach().clone().requires_grad_(True)
            return torch.cat([x[:, :1].detach(), leaf["v"]], dim=1)

        ids = input_ids.to(self.device)
        logits = spliced_logits(self.hf_model, ids, {self.site(site): open_up}, grad=True)
        scored = logits[:, 1:-1]
        scored = scored.to(torch.promote_types(scored.dtype, torch.float32))
        loss = torch.nn.functional.cross_entropy(scored.reshape(-1, scored.shape[-1]),
                                                 ids[:, 2:].reshape(-1), reduction="sum")
        (g,) = torch.autograd.grad(loss, [leaf["v"]])
        return g.detach()

    def final_hidden(self, input_ids: Tensor,
                     splice: Mapping[str, Callable[[Tensor], Tensor | None]] | None = None
                     ) -> Tensor:
        """The LM head's input [batch, pos, d] (after the final norm), with sites replaced as
        in `logits`; `unembedding()` maps it to the logits."""
        splices = {self.site(name): fn for name, fn in (splice or {}).items()}
        return spliced_final_hidden(self.hf_model, input_ids.to(self.device), splices)

    def unembedding(self) -> Unembedding | None:
        """The head as an affine map of `final_hidden`, or None where the model's logits are
        something else (Gemma 2's soft-capping, a logit scale): checked once, on a probe of
        two tokens, against the model's own logits."""
        if not self._probed:
            self._unembedding, self._probed = self._probe_unembedding(), True
        return self._unembedding

    def _probe_unembedding(self) -> Unembedding | None:
        head = self.hf_model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            return None
        probe = torch.tensor([[self.bos_token_id, self.bos_token_id]], device=self.device)
        unembed = Unembedding(head.weight.detach(),
                              None if head.bias is None else head.bias.detach())
        with torch.inference_mode():
            expected = self.logits(probe)
            got = torch.nn.functional.linear(self.final_hidden(probe), unembed.weight,
                                             unembed.bias)
        return unembed if torch.allclose(got, expected, rtol=1e-5, atol=1e-5) else None

    def fingerprint(self) -> str:
        """sha256 of the weights' source files (or tensors), computed once on first use."""
        if self._fingerprint is None:
            fn = self.fingerprint_fn or (lambda: _hash_tensors(self.hf_model))
            self._fingerprint = fn()
        return self._fingerprint


def _hash_tensors(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()

