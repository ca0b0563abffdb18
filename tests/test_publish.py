"""python -m train.publish: file selection, dry run, and the Hub calls against a mocked HfApi."""

from __future__ import annotations

from unittest import mock

import pytest
from huggingface_hub.utils import filter_repo_objects

from train import publish
from train.publish import code_files, main, plan_upload

CONFIG = (
    b'{"auto_map": {"AutoConfig": "configuration_lgffem.LgffemConfig", "AutoModel": "modeling_lgffem.LgffemModel"}}'
)
PREPROCESSOR = b'{"auto_map": {"AutoImageProcessor": "image_processing_lgffem.LgffemImageProcessor"}}'
# The remote code as save_pretrained writes it: three files named by auto_map, one imported by the model.
CODE_FILES = {
    "configuration_lgffem.py": b"# config\n",
    "functional_lgffem.py": b"# ops\n",
    "image_processing_lgffem.py": b"# processor\n",
    "modeling_lgffem.py": b"try:\n    from .functional_lgffem import gem\nexcept ImportError:\n    pass\n",
}
MODEL_FILES = {
    "README.md": b"---\nlibrary_name: transformers\n---\n",
    "config.json": CONFIG,
    "model.safetensors": b"0123456789",
    "preprocessor_config.json": PREPROCESSOR,
    "metrics.csv": b"epoch,loss\n1,2.0\n",
    "training_args.json": b"{}",
    **CODE_FILES,
}
# What publishing a model folder uploads, sorted: everything in MODEL_FILES, nothing in NOT_UPLOADED.
EXPECTED_UPLOAD = (
    "README.md",
    "config.json",
    "configuration_lgffem.py",
    "functional_lgffem.py",
    "image_processing_lgffem.py",
    "metrics.csv",
    "model.safetensors",
    "modeling_lgffem.py",
    "preprocessor_config.json",
    "training_args.json",
)
NOT_UPLOADED = {
    "checkpoints/checkpoint-epoch-001/model.safetensors": b"x",
    "checkpoints/checkpoint-epoch-001/optimizer.pt": b"x",
    ".cache/huggingface/upload.lock": b"x",
    ".hidden": b"x",
    "metrics.csv.tmp": b"x",
    "__pycache__/modeling_lgffem.cpython-311.pyc": b"x",
}


def _write(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture()
def model_dir(tmp_path):
    return _write(tmp_path / "lgffem-lung", {**MODEL_FILES, **NOT_UPLOADED})


@pytest.fixture()
def upload_dir(tmp_path):
    return _write(tmp_path / "lung-index", {"index.faiss": b"f" * 5, "metadata.parquet": b"p", "manifest.json": b"{}"})


def test_plan_lists_exactly_the_model_files(model_dir):
    plan = plan_upload(model_dir, "org/lgffem-lung", "model")
    assert plan.files == EXPECTED_UPLOAD
    assert plan.sizes == tuple(len(MODEL_FILES[f]) for f in plan.files)
    assert plan.commit_message == "Upload LGFFEM model from lgffem-lung"
    # upload_folder selects files with these allow_patterns: exactly the planned ones.
    every_file = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert sorted(filter_repo_objects(every_file, allow_patterns=list(plan.files))) == list(plan.files)


def test_code_files_are_what_auto_map_loads(model_dir):
    assert code_files(model_dir) == [
        "configuration_lgffem.py",
        "functional_lgffem.py",  # imported by modeling_lgffem.py, named by no auto_map
        "image_processing_lgffem.py",
        "modeling_lgffem.py",
    ]


def test_a_folder_saved_with_the_single_file_model_still_publishes(tmp_path):
    old = {
        "config.json": CONFIG.replace(b"configuration_lgffem.", b"modeling_lgffem."),
        "preprocessor_config.json": b'{"auto_map": {"AutoImageProcessor": "modeling_lgffem.LgffemImageProcessor"}}',
        "modeling_lgffem.py": b"# config, model and processor in one file\n",
        "model.safetensors": b"0",
        "README.md": b"card",
    }
    folder = _write(tmp_path / "old", old)
    assert code_files(folder) == ["modeling_lgffem.py"]
    assert plan_upload(folder, "org/old", "model").files == (
        "README.md",
        "config.json",
        "model.safetensors",
        "modeling_lgffem.py",
        "preprocessor_config.json",
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"functional_lgffem.py": None}, "missing functional_lgffem.py (loaded through its auto_map)"),
        (
            {"configuration_lgffem.py": None, "image_processing_lgffem.py": None},
            "missing configuration_lgffem.py, image_processing_lgffem.py (loaded through its auto_map)",
        ),
        ({"config.json": b"{}", "preprocessor_config.json": b"{}"}, "config.json names no model code (no auto_map)"),
    ],
)
def test_a_model_folder_without_its_remote_code_is_refused(tmp_path, change, message):
    files = {name: data for name, data in {**MODEL_FILES, **change}.items() if data is not None}
    folder = _write(tmp_path / "m", files)
    with pytest.raises(ValueError) as err:
        plan_upload(folder, "org/m", "model")
    assert str(err.value) == f"{folder} is not a trained model folder (python -m train): {message}"


@pytest.mark.parametrize(
    "text, message",
    [(b"[1, 2]", "is not a JSON object"), (b"{", "is not valid JSON (Expecting property name enclosed in double")],
)
def test_a_broken_config_json_is_named(tmp_path, text, message):
    folder = _write(tmp_path / "m", {**MODEL_FILES, "config.json": text})
    with pytest.raises(ValueError) as err:
        plan_upload(folder, "org/m", "model")
    assert str(err.value).startswith(f"{folder / 'config.json'} {message}")


def test_dry_run_prints_the_upload_and_calls_nothing(model_dir, capsys):
    api = mock.MagicMock()
    assert main(["--model-dir", str(model_dir), "--repo-id", "org/lgffem-lung", "--private", "--dry-run"], api=api) == 0
    assert api.mock_calls == []
    expected = [
        "DRY RUN, nothing uploaded. Would upload:",
        "repo: org/lgffem-lung (type model, private, revision main)",
        f"folder: {model_dir}",
        "commit message: Upload LGFFEM model from lgffem-lung",
        "files (10, 357 B):",
        "  README.md  35 bytes",
        "  config.json  109 bytes",
        "  configuration_lgffem.py  9 bytes",
        "  functional_lgffem.py  6 bytes",
        "  image_processing_lgffem.py  12 bytes",
        "  metrics.csv  17 bytes",
        "  model.safetensors  10 bytes",
        "  modeling_lgffem.py  73 bytes",
        "  preprocessor_config.json  84 bytes",
        "  training_args.json  2 bytes",
    ]
    assert capsys.readouterr().out.splitlines() == expected


def test_upload_model_calls_create_repo_branch_and_upload_folder(model_dir, capsys):
    api = mock.MagicMock()
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/org/lgffem-lung/commit/abc")
    argv = ["--model-dir", str(model_dir), "--repo-id", "org/lgffem-lung", "--private", "--revision", "v1"]
    assert main(argv + ["--commit-message", "first model"], api=api) == 0
    assert api.mock_calls[0] == mock.call.create_repo(
        repo_id="org/lgffem-lung", repo_type="model", private=True, exist_ok=True
    )
    assert api.mock_calls[1] == mock.call.create_branch(
        repo_id="org/lgffem-lung", repo_type="model", branch="v1", exist_ok=True
    )
    assert api.mock_calls[2] == mock.call.upload_folder(
        folder_path=str(model_dir),
        repo_id="org/lgffem-lung",
        repo_type="model",
        revision="v1",
        commit_message="first model",
        allow_patterns=list(EXPECTED_UPLOAD),
    )
    assert len(api.mock_calls) == 3
    assert capsys.readouterr().out.splitlines()[-1] == "https://huggingface.co/org/lgffem-lung/commit/abc"


def test_upload_index_to_a_dataset_repo_without_branch(upload_dir, monkeypatch):
    instances = []

    def fake_hfapi(token=None):
        api = mock.MagicMock()
        api.token = token
        instances.append(api)
        return api

    monkeypatch.setattr(publish, "HfApi", fake_hfapi)
    assert main(["--index-dir", str(upload_dir), "--repo-id", "org/lung-index", "--token", "hf_abc"]) == 0
    (api,) = instances
    assert api.token == "hf_abc"
    api.create_repo.assert_called_once_with(repo_id="org/lung-index", repo_type="dataset", private=False, exist_ok=True)
    api.create_branch.assert_not_called()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_type"] == "dataset" and kwargs["revision"] is None
    assert kwargs["allow_patterns"] == ["index.faiss", "manifest.json", "metadata.parquet"]
    assert kwargs["commit_message"] == "Upload LGFFEM index from lung-index"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repo-id", "org/x"], "one of the arguments --model-dir --index-dir is required"),
        (["--model-dir", "{model}", "--index-dir", "{index}", "--repo-id", "org/x"], "not allowed with"),
        (["--model-dir", "{index}", "--repo-id", "org/x"], "missing config.json, model.safetensors"),
        (["--index-dir", "{model}", "--repo-id", "org/x"], "missing index.faiss, metadata.parquet, manifest.json"),
        (["--model-dir", "{model}", "--repo-id", "no-org"], "repo_id must look like ORG/NAME"),
        (["--model-dir", "{model}/nope", "--repo-id", "org/x"], "folder not found"),
        (["--model-dir", "{model}", "--repo-id", "org/x", "--privat"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_refused_before_any_call(argv, message, model_dir, upload_dir, capsys):
    api = mock.MagicMock()
    argv = [a.format(model=model_dir, index=upload_dir) for a in argv]
    with pytest.raises(SystemExit):
        main(argv, api=api)
    assert message in capsys.readouterr().err
    assert api.mock_calls == []
