"""adamkit in the Hugging Face Trainer and in Lightning, the way the README shows.

Neither library is a dependency: these tests run where they are installed (checked
with transformers 5.23 and lightning 2.6) and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import adamkit


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return x, x.sum(1)


def _loss(linear: torch.nn.Linear) -> float:
    x, y = _data()
    return torch.nn.functional.mse_loss(linear(x).squeeze(-1), y).item()


def test_hugging_face_trainer_steps_an_adamkit_optimizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 1)

        def forward(self, x, labels=None):
            out = self.linear(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    x, y = _data()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]
    model = Model()
    before = _loss(model.linear)
    optimizer = adamkit.AdamW(model.parameters(), lr=5e-2, weight_decay=0.01, state_precision="int8")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=5, per_device_train_batch_size=16, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, None)).train()
    assert optimizer.state[model.linear.weight]["step"] == 20  # 5 epochs of 4 batches
    assert "exp_avg_int8" in optimizer.state[model.linear.weight]
    assert _loss(model.linear) < before / 2


def test_lightning_steps_an_adamkit_optimizer():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

        def configure_optimizers(self):
            return adamkit.AdamW(self.parameters(), lr=5e-2, rounding="kahan")

    module = Module()
    before = _loss(module.linear)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=16)
    trainer = lightning.Trainer(
        max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, adamkit.AdamW)
    assert optimizer.state[module.linear.weight]["step"] == 20
    assert _loss(module.linear) < before / 2
