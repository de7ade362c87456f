"""Read sites during a forward pass (stopping once all are read) and splice values into them.

Both work with plain PyTorch hooks on the Hugging Face modules a `Site` names, so any model
that `transformers` runs works unchanged. Reading raises `_StopForward` from the hook of the
last site reached, so later blocks, the final norm and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress

import torch
from torch import Tensor, nn

from saelab.lm.sites import Site

# A function applied to a site's value: returns the replacement, or None to leave it as is.
SiteFn = Callable[[Tensor], "Tensor | None"]


class _StopForward(Exception):
    """Raised from a hook once every requested site is read."""


def attach(model: nn.Module, site: Site, fn: SiteFn) -> torch.utils.hooks.RemovableHandle:
    """Call `fn` on the site's value [batch, pos, width] each forward pass; use its return."""
    module = model.get_submodule(site.module_path)
    if site.side == "in":

        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(_mod: nn.Module, _args: tuple, output: Tensor | tuple) -> Tensor | tuple | None:
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(post_hook)


@contextmanager
def hooked(model: nn.Module, fns: Mapping[Site, SiteFn]) -> Iterator[None]:
    """Keep `fns` attached to their sites for the duration of the block."""
    handles = [attach(model, site, fn) for site, fn in fns.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_sites(model: nn.Module, sites: Sequence[Site], input_ids: Tensor,
               attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Values of `sites` [batch, pos, width] for `input_ids` [batch, pos], in one pass that
    stops as soon as the last of them is computed."""
    captured: dict[str, Tensor] = {}

    def recorder(site: Site) -> SiteFn:
        def record(x: Tensor) -> None:
            captured[site.name] = x.detach()
            if len(captured) == len(sites):
                raise _StopForward

        return record

    fns = {site: recorder(site) for site in sites}
    with hooked(model, fns), torch.inference_mode(), suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [s.name for s in sites if s.name not in captured]
    if missing:  # a bug in a Family mapping, not a user error
        raise RuntimeError(f"forward pass never reached sites {missing}")
    return captured


def spliced_logits(model: nn.Module, input_ids: Tensor, splices: Mapping[Site, SiteFn],
                   attention_mask: Tensor | None = None, *, grad: bool = False) -> Tensor:
    """Logits [batch, pos, vocab] with each site's value replaced by its function's output;
    with `grad`, the pass keeps its graph (for a gradient with respect to a spliced value)."""
    with hooked(model, splices), (torch.enable_grad() if grad else torch.inference_mode()):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits


def spliced_final_hidden(model: nn.Module, input_ids: Tensor, splices: Mapping[Site, SiteFn]
                         ) -> Tensor:
    """The LM head's input [batch, pos, d] (the base model's last hidden state, after the
    final norm) with sites replaced as in `spliced_logits`: the head is left to the caller,
    which can apply it a vocabulary slice at a time."""
    base: nn.Module = getattr(model, "base_model")  # a PreTrainedModel's trunk
    with hooked(model, splices), torch.inference_mode():
        return base(input_ids=input_ids, use_cache=False).last_hidden_state
