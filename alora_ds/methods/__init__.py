"""The fine-tuning methods, one class each behind one interface (alora_ds.methods.base).

    build_method("alora", MethodSettings(...))

A new method is a subclass of Method, overriding only the hooks where it differs, and one entry
in METHODS; the trainer does not change.
"""

from __future__ import annotations

from alora_ds.methods.adalora import AdaLoRA
from alora_ds.methods.alora import ALoRA
from alora_ds.methods.base import Method, MethodSettings
from alora_ds.methods.dnas import ALoRADNAS
from alora_ds.methods.lora import LoRA
from alora_ds.methods.sensi import ALoRASensi
from alora_ds.methods.sora import SoRA

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (ALoRA, LoRA, ALoRADNAS, ALoRASensi, AdaLoRA, SoRA)
}


def build_method(name: str, settings: MethodSettings) -> Method:
    """The method called `name` (one of METHODS), with its settings checked."""
    method = METHODS[name](settings)
    method.check()
    return method


__all__ = ["METHODS", "Method", "MethodSettings", "build_method"]
