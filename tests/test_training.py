from pathlib import Path

import pytest
import torch

import neuralode as node


def test_auto_profile_follows_cuda(monkeypatch):
    assert node.resolve_profile("auto") == ("colab" if torch.cuda.is_available() else "cpu")
    # On a CUDA machine "auto" is the colab profile (minutes), never the paper-scale gpu one (hours).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert node.resolve_profile("auto") == "colab"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert node.resolve_profile(" Auto ") == "cpu"


@pytest.mark.parametrize("name", ["smoke", "cpu", "colab", "gpu", " SMOKE "])
def test_named_profiles_pass_through(name):
    assert node.resolve_profile(name) == name.strip().lower()


def test_unknown_profile_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown profile 'fast'.*smoke, cpu, colab, gpu.*NEURALODE_PROFILE"):
        node.resolve_profile("fast")
    with pytest.raises(TypeError):
        node.resolve_profile(None)


def test_checkpoint_dir_is_local_without_drive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEURALODE_DRIVE", str(tmp_path / "no-drive-here"))
    path = node.checkpoint_dir("ch4")
    assert path == Path("checkpoints") / "ch4" and path.is_dir()
    assert not (tmp_path / "no-drive-here").exists()


def test_checkpoint_dir_goes_to_drive_and_brings_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    monkeypatch.setenv("NEURALODE_DRIVE", str(drive))
    local = tmp_path / "checkpoints" / "ch4"
    local.mkdir(parents=True)
    (local / "a.pt").write_bytes(b"local a")       # written before Drive was mounted
    (local / "b.pt").write_bytes(b"local b")
    there = drive / "neuralode-checkpoints" / "ch4"
    there.mkdir(parents=True)
    (there / "b.pt").write_bytes(b"drive b")       # Drive's own copy is newer: it is kept
    path = node.checkpoint_dir("ch4")
    assert path == there
    assert (there / "a.pt").read_bytes() == b"local a"
    assert (there / "b.pt").read_bytes() == b"drive b"
    assert sorted(p.name for p in there.iterdir()) == ["a.pt", "b.pt"]   # no partial copies left


def test_checkpoint_dir_resume_from_drive_reproduces_the_run(tmp_path, monkeypatch):
    """fit resumes from a checkpoint on Drive: two epochs, interrupted after one, equal two in a row."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "MyDrive").mkdir()
    monkeypatch.setenv("NEURALODE_DRIVE", str(tmp_path / "MyDrive"))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

    batches = []

    def run(epochs, checkpoint):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 2)
        model.register_forward_hook(lambda *_: batches.append(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        node.fit(model, loader, epochs=epochs, optimizer=opt, checkpoint=checkpoint, seed=0, progress=False)
        return model.weight.detach().clone()

    straight = run(2, None)
    ckpt = node.checkpoint_dir("resume") / "linear.pt"
    run(1, ckpt)
    assert ckpt.exists() and ckpt.parent == tmp_path / "MyDrive" / "neuralode-checkpoints" / "resume"
    batches.clear()
    assert torch.equal(run(2, ckpt), straight)
    assert len(batches) == len(loader)     # the resumed run trained the second epoch only


def test_checkpoint_dir_refuses_paths():
    for bad in ["", "a/b", "..", None]:
        with pytest.raises(ValueError, match="one folder name"):
            node.checkpoint_dir(bad)


def test_default_device_and_seeding():
    assert node.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    node.seed_everything(3)
    a = torch.randn(3)
    g = node.seed_everything(3)
    assert torch.equal(a, torch.randn(3))
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(3)))


def test_saved_tensor_bytes_counts_a_tensor_saved_twice_once():
    # tanh saves its output y, and y * y saves y twice more: three saves, one storage.
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    nbytes = 1000 * 8
    assert node.saved_tensor_bytes(lambda: (x.tanh() * x.tanh()).sum()) == 2 * nbytes  # two tanh outputs
    assert node.saved_tensor_bytes(lambda: (lambda y: y * y)(x.tanh()).sum()) == nbytes
    assert node.saved_tensor_bytes(lambda: (lambda y: y * y)(x.tanh()).sum(), peak=True) == nbytes


def test_saved_tensor_bytes_counts_views_of_one_parameter_once_at_its_full_size():
    w = torch.randn(10, 100, dtype=torch.float64, requires_grad=True)
    s = torch.randn(10, 50, dtype=torch.float64, requires_grad=True)

    def five_evaluations():  # a parameter sliced and saved at every evaluation, as in ConcatLinear
        return sum((w[:, :50] * s).sum() for _ in range(5))

    assert node.saved_tensor_bytes(five_evaluations) == w.numel() * 8 + s.numel() * 8


def test_saved_tensor_bytes_counts_a_storage_again_once_it_was_released():
    # Three graphs, each freed by its backward before the next is built: the allocator may hand the
    # same address to the next one, which must still count (total), while the peak is one graph.
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)

    def three_steps():
        for _ in range(3):
            x.tanh().sum().backward()

    assert node.saved_tensor_bytes(three_steps) == 3 * 1000 * 8
    assert node.saved_tensor_bytes(three_steps, peak=True) == 1000 * 8
