"""A progress bar over a model's layers for its next forward pass, the prefill: one call that
takes minutes for a long prompt on a CPU (8300 tokens of the embedded SmolLM2: 91 s on 2 cores)
and shows nothing of its own."""
from tqdm import tqdm


class PrefillProgress:
    """Within a ``with`` block, a bar counting the layers of ``model.layers``
    (kcache_ops.model.Llama's) as the next forward pass runs them. The bar appears when the pass
    begins (what is printed before it, a warning, keeps its own line); once every layer has run
    it closes and its hooks are removed, so the decode steps after the prefill run none. Leaving
    the block does both where the pass did not finish (an error). On CUDA a layer counts when
    its kernels are queued, not when they have run: the hooks never wait on the device."""

    def __init__(self, model, desc="prefill"):
        self.layers, self.desc = model.layers, desc
        self.bar = None  # tqdm, from the start of the pass
        self.hooks = []

    def __enter__(self):
        for layer in self.layers:
            self.hooks += [layer.register_forward_pre_hook(self._start),
                           layer.register_forward_hook(self._layer_done)]
        return self

    def __exit__(self, *_):
        self._close()

    def _start(self, *_):
        if self.bar is None:
            self.bar = tqdm(total=len(self.layers), desc=self.desc, unit="layer", leave=False)

    def _layer_done(self, *_):
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self._close()

    def _close(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        if self.bar is not None:
            self.bar.close()
