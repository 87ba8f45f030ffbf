import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import neuralode as node


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _run(checkpoint=None, stop_after_epochs=None, epochs=3, model_kind="ode"):
    node.seed_everything(0)
    if model_kind == "ode":
        model = torch.nn.Sequential(node.ODEBlock(node.MLPDynamics(2, hidden=16), rtol=1e-4, atol=1e-4),
                                    torch.nn.Linear(2, 2))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    loader = DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = node.fit(model, loader, epochs=epochs, optimizer=optimizer, scheduler=scheduler,
                       val_loader=DataLoader(_data(seed=2), batch_size=32), device="cpu",
                       checkpoint=checkpoint, progress=False, stop_after_epochs=stop_after_epochs)
    return model, history


def test_fit_records_history_and_nfe():
    model, history = _run()
    assert history.epochs == 3 and len(history.epoch_val_accuracy) == 3 and len(history.batch_loss) == 18
    assert all(n > 0 for n in history.batch_nfe) and all(n == 0 for n in history.batch_backward_nfe)
    assert history.epoch_train_loss[-1] < history.epoch_train_loss[0]
    _, mlp_history = _run(model_kind="mlp")
    assert set(mlp_history.batch_nfe) == {0}


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path):
    straight, straight_history = _run(tmp_path / "a.pt")
    _run(tmp_path / "b.pt", stop_after_epochs=1)  # "the Colab runtime disconnects" after one epoch
    assert (tmp_path / "b.pt").exists()
    resumed, resumed_history = _run(tmp_path / "b.pt")  # a new process: new model, optimizer, loader
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_history.batch_loss == straight_history.batch_loss
    assert resumed_history.epoch_val_accuracy == straight_history.epoch_val_accuracy
    assert not list(tmp_path.glob("*.tmp"))


def test_max_batches_and_evaluate():
    node.seed_everything(0)
    model = torch.nn.Linear(2, 2)
    loader = DataLoader(_data(), batch_size=16)
    history = node.fit(model, loader, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       max_batches=2, progress=False, device="cpu")
    assert len(history.batch_loss) == 4
    loss, accuracy = node.evaluate(model, loader)
    assert loss > 0 and 0 <= accuracy <= 1


def test_bad_epochs():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="epochs must be a non-negative integer"):
        node.fit(model, [], epochs=-1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
