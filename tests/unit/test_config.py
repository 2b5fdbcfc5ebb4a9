"""Bad input stops `shoal train` before any worker starts: one sentence naming
the key and what is allowed, exit code 2, no traceback (in this process; the
same through a real `shoal` process is in tests/multiproc/test_cli.py)."""

from __future__ import annotations

import pytest

from shoal import cli
from shoal.errors import ConfigError
from shoal.train import jobconfig as config
from tests.helpers.procs import ROOT


def load(*overrides: str):
    return config.load(None, config.parse_overrides(list(overrides)))


def test_defaults_are_the_digits_job():
    cfg = load()
    assert (cfg.model.name, cfg.data.name, cfg.strategy.name) == ("mlp", "digits", "data_parallel")
    assert cfg.launch.workers == 2


def test_overrides_parse_types_and_lists(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[train]\nsteps = 7\n[model]\nname = "mlp"\nhidden = [16]\n')
    cfg = config.load(
        path,
        config.parse_overrides(
            ["--train.steps", "9", "--model.hidden=[8,4]", "--optimizer.lr=1", "--checkpoint.resume"]
        ),
    )
    assert cfg.train.steps == 9 and cfg.model.options.hidden == [8, 4]
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.checkpoint.resume is True


def test_dump_round_trips(tmp_path):
    cfg = load("--model.name=cnn", "--strategy.grad_accum=3", "--strategy.clip_norm=0.5")
    path = tmp_path / "c.toml"
    path.write_text(config.dump_toml(cfg))
    again = config.load(path)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.stpes=3"], "unknown config key 'train.stpes' (did you mean 'steps'?)"),
        (["--train.steps=0"], "'train.steps' must be >= 1, not 0"),
        (["--train.steps=ten"], "'train.steps' must be an integer, not str 'ten'"),
        (["--launch.workers=0"], "'launch.workers' must be >= 1, not 0"),
        (["--model.name=resnet"], "unknown model 'resnet' in 'model.name'; choose one of"),
        (["--data.name=mnist"], "unknown data set 'mnist' in 'data.name'; choose one of"),
        (["--strategy.grad_accum=0"], "'strategy.grad_accum' must be >= 1, not 0"),
        (["--strategy.clip_norm=-1"], "'strategy.clip_norm' must be > 0"),
        (["--optimizer.name=lamb"], "'optimizer.name' must be one of sgd, adam, adamw, not 'lamb'"),
        (["--model.hidden=12"], "'model.hidden' must be a list, not int 12"),
        (["--trian.steps=3"], "unknown config section 'trian' (did you mean 'train'?)"),
        (["--launch.nnodes=2"], "'launch.rdzv_endpoint' (HOST:PORT) is needed when nnodes > 1"),
        (["--launch.timeout_s=inf"], "'launch.timeout_s' must be a finite number, not inf"),
        (["--launch.rdzv_backend=zookeeper"], "'launch.rdzv_backend' must be one of static, c10d, etcd, etcd-v2"),
        (["--launch.rdzv_backend=c10d"], "'launch.rdzv_backend' c10d needs rdzv_endpoint = \"HOST:PORT\""),
        (["--launch.control=zookeeper://h:1"], "'launch.control' must be raft, raft://H:P,H:P,H:P or etcd://HOST:PORT"),
        (["--strategy.name=parameter_server", "--strategy.timeout_s=nan"], "'strategy.timeout_s' must be a finite"),
        (["--optimizer.lr=nan"], "'optimizer.lr' must be a finite number, not nan"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    assert message in str(info.value)


def test_cli_bad_input_exit_code_2_without_traceback(capsys, tmp_path):
    assert cli.main(["train", "--train.steps=0", f"--logging.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "shoal: 'train.steps' must be >= 1, not 0"
    assert not any(tmp_path.iterdir()), "no run directory may be made for bad input"
    assert cli.main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "config file" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["run", "-n", "2", str(tmp_path / "nope.py")]) == 2
    assert "script" in capsys.readouterr().err


def test_rdzv_backend_is_a_launch_key_that_round_trips(tmp_path):
    assert load().launch.rdzv_backend == "static"
    cfg = load("--launch.rdzv_backend=c10d", "--launch.nnodes=2", "--launch.rdzv_endpoint=10.0.0.1:29500")
    assert cfg.launch.rdzv_backend == "c10d"
    path = tmp_path / "c.toml"
    path.write_text(config.dump_toml(cfg))
    assert config.load(path).launch.rdzv_backend == "c10d"


def test_train_etcd_rendezvous_says_what_to_install(monkeypatch):
    monkeypatch.setattr("shoal.config.etcd_client_installed", lambda: False)  # the test extra installs python-etcd
    with pytest.raises(ConfigError) as info:
        load("--launch.rdzv_backend=etcd", "--launch.rdzv_endpoint=10.0.0.1:2379")
    assert "'launch.rdzv_backend' etcd needs the python-etcd package (pip install python-etcd)" in str(info.value)


def test_train_parameter_servers_on_several_machines_need_static_rendezvous(capsys, tmp_path):
    args = ["--strategy.name=parameter_server", "--launch.nnodes=2", "--launch.rdzv_endpoint=10.0.0.1:29500"]
    assert cli.main(["train", *args, "--launch.rdzv_backend=c10d", f"--logging.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'parameter servers on several machines need launch.rdzv_backend = "static"' in err and "\n" not in err
    assert not any(tmp_path.iterdir()), "no run directory may be made for bad input"


def test_train_hands_rdzv_backend_to_the_launcher(monkeypatch, tmp_path):
    """`launch.rdzv_backend` reaches the LaunchSpec that torch's agent is started with."""
    from rich.console import Console

    from shoal.launch import job

    seen = []
    monkeypatch.setattr(job, "launch", lambda argv, spec: seen.append(spec))
    cfg = load(
        "--launch.rdzv_backend=c10d",
        "--launch.nnodes=2",
        "--launch.rdzv_endpoint=10.0.0.1:29500",
        f"--logging.run_dir={tmp_path}",
        "--logging.progress=false",
    )
    job.run_workers(cfg, job.prepare_run_dir(cfg, Console(quiet=True)), Console(quiet=True))
    assert [(s.rdzv_backend, s.nnodes, s.rdzv_endpoint) for s in seen] == [("c10d", 2, "10.0.0.1:29500")]


SCRIPT = "examples/ps_loop.py"
EP = ["--rdzv-endpoint", "127.0.0.1:29500"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--server-nodes", "1", SCRIPT], "--server-nodes 1 needs --servers S"),
        (["--servers", "1", "--server-nodes", "2", SCRIPT], "give every server node at least one server"),
        (["--servers", "2", "--server-node-rank", "0"], "--server-node-rank needs --server-nodes H"),
        (["--servers", "2", "--server-nodes", "2", "--server-node-rank", "2"], "must be in 0..1 for --server-nodes 2"),
        (["--servers", "2", "--server-nodes", "1", "--server-node-rank", "0", SCRIPT], "a server node"),
        (["--servers", "2"], "shoal run needs a script"),
        (["--rdzv-backend", "zookeeper", SCRIPT], "--rdzv-backend must be one of static, c10d, etcd, etcd-v2"),
        (["--rdzv-backend", "c10d", "--nnodes", "2", SCRIPT], "--rdzv-backend c10d needs --rdzv-endpoint"),
        (["--rdzv-backend", "c10d", "--nnodes", "2", "--servers", "2", *EP, SCRIPT], "need --rdzv-backend static"),
    ],
)
def test_run_refuses_bad_server_nodes_and_rendezvous_in_one_sentence(capsys, args, message):
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shoal: ") and message in err and "\n" not in err


def test_run_etcd_rendezvous_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setattr("shoal.config.etcd_client_installed", lambda: False)  # the test extra installs python-etcd
    assert cli.main(["run", "--rdzv-backend", "etcd", *EP, SCRIPT]) == 2
    assert "needs the python-etcd package (pip install python-etcd)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0", "-5"])
def test_a_bad_shoal_timeout_s_is_one_sentence_for_the_launcher_and_the_workers(capsys, monkeypatch, value):
    from shoal import env, runtime

    monkeypatch.setenv(env.TIMEOUT_S, value)
    assert cli.main(["run", SCRIPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shoal: SHOAL_TIMEOUT_S must be a number of seconds > 0") and "\n" not in err
    monkeypatch.setattr(runtime, "_current", None)
    with pytest.raises(ConfigError, match="SHOAL_TIMEOUT_S must be a number of seconds > 0"):
        runtime.init()  # what a worker of a job started with it does first


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    config.load(path)


def test_default_example_is_the_default_job():
    examples = ROOT / "examples"
    assert config.load(examples / "digits.toml").to_dict() == config.load(None).to_dict()


def test_a_rendezvous_across_machines_is_named_the_same_on_each_and_apart_per_job():
    from shoal.launch.agent import rdzv_id

    a, b = rdzv_id(environ={"SHOAL_JOB_KEY": "a" * 32}), rdzv_id(environ={"SHOAL_JOB_KEY": "b" * 32})
    assert a == rdzv_id(environ={"SHOAL_JOB_KEY": "a" * 32}) and a != b and "a" * 8 not in a  # no key in it
    assert rdzv_id("mine", environ={"SHOAL_JOB_KEY": "a" * 32}) == "mine"
    assert rdzv_id(environ={}) == "shoal-job"
    assert rdzv_id(backend="static", environ={"SHOAL_JOB_KEY": "a" * 32}) == "shoal-job"  # its store is the job's
