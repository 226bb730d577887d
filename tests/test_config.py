from __future__ import annotations

import os
import subprocess
import sys

import pytest

from difflens.config import WORKER_GOMP_SPINCOUNT, Settings, limit_idle_spin
from difflens.errors import InvalidArgument


def test_env_then_flags():
    s = Settings.from_env({"DIFFLENS_UNET_BACKEND": "compile", "DIFFLENS_DTYPE": "bfloat16"}, unet_backend=None)
    assert (s.unet_backend, s.dtype, s.device) == ("compile", "bfloat16", "cpu")
    assert Settings.from_env({"DIFFLENS_UNET_BACKEND": "compile"}, unet_backend="eager").unet_backend == "eager"


@pytest.mark.parametrize("key,value,field", [("DIFFLENS_UNET_BACKEND", "tensorrt", "unet_backend"),
                                             ("DIFFLENS_DTYPE", "int8", "dtype"),
                                             ("DIFFLENS_DEVICE", "tpu", "device"),
                                             ("DIFFLENS_DEVICE", "cudafoo", "device")])
def test_bad_values_name_the_variable_or_the_field(key, value, field):
    """From the environment, the error names the variable (the user typed no flag); given as a flag, the field
    (the CLI names its flag)."""
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({key: value})
    assert e.value.field == key and value in e.value.message
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({}, **{field: value})
    assert e.value.field == field


def test_omp_num_threads_may_list_nesting_levels():
    assert Settings.from_env({"OMP_NUM_THREADS": "4,2"}).threads == 4


def test_a_cuda_device_this_process_lacks_is_refused_before_loading(tiny_dir):
    import torch

    from difflens.engine.loading import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidArgument) as e:
        load_model(tiny_dir, device="cuda")
    assert e.value.field == "device" and "no CUDA device" in e.value.message


@pytest.mark.parametrize("value,allowed", [("two", "an integer"), ("-1", "an integer >= 0")])
def test_threads_from_the_environment_are_checked(value, allowed):
    assert Settings.from_env({"DIFFLENS_THREADS": "3"}).threads == 3
    assert Settings.from_env({"DIFFLENS_THREADS": "3"}, threads=1).threads == 1
    assert Settings.from_env({"OMP_NUM_THREADS": "2"}).threads == 2
    assert Settings.from_env({"OMP_NUM_THREADS": "2", "DIFFLENS_THREADS": "3"}).threads == 3
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({"DIFFLENS_THREADS": value})
    assert e.value.field == "DIFFLENS_THREADS" and allowed in e.value.message and repr(value) in e.value.message


@pytest.mark.parametrize("files,limit", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2 threads
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no limit
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup files at all
])
def test_available_cpus_follows_the_container_cpu_limit(tmp_path, files, limit):
    import os

    from difflens.config import available_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (affinity if limit is None else min(affinity, limit))


def test_apply_threads_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        assert Settings(threads=1).apply_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_service_settings_from_env_and_flags():
    from difflens.config import SHIPPED_MODEL, ServiceSettings

    s = ServiceSettings.from_env({"DIFFLENS_REDIS_URL": "redis://h:1/0", "DIFFLENS_MAX_QUEUE_DEPTH": "5"}, port=9)
    assert (s.redis_url, s.max_queue_depth, s.port) == ("redis://h:1/0", 5, 9)
    assert s.model_dirs() == {"default": str(SHIPPED_MODEL)}
    assert ServiceSettings(models=(("a", "/x"),)).model_dirs() == {"a": "/x"}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"models": (("a", "/x"), ("a", "/y"))}, "model"),
    ({"heartbeat_interval_s": 40.0}, "heartbeat_interval_s"),
    ({"max_deliveries": 0}, "max_deliveries"),
    ({"redis_wait_s": -1.0}, "redis_wait_s"),
    ({"result_ttl_s": 0.0}, "result_ttl_s"),
    ({"heartbeat_interval_s": 0.0}, "heartbeat_interval_s"),  # would spin a CPU on an idle worker
    ({"visibility_timeout_s": -1.0}, "visibility_timeout_s"),
    ({"max_queue_depth": 0}, "max_queue_depth"),  # every request would be RESOURCE_EXHAUSTED
    ({"worker_max_jobs": 0}, "worker_max_jobs"),
    ({"worker_max_batch": 0}, "worker_max_batch"),
    ({"drain_grace_s": -1.0}, "drain_grace_s"),
])
def test_service_settings_reject_bad_values(kwargs, field):
    from difflens.config import ServiceSettings

    with pytest.raises(InvalidArgument, match=field):
        ServiceSettings(**kwargs)


def test_parse_models_names_the_flag():
    from difflens.config import ServiceSettings

    assert ServiceSettings.parse_models(["a=/m", "b=rel/dir"]) == (("a", "/m"), ("b", "rel/dir"))
    with pytest.raises(InvalidArgument, match="--model"):
        ServiceSettings.parse_models(["nodir"])
    with pytest.raises(InvalidArgument, match="DIFFLENS_MAX_QUEUE_DEPTH"):
        ServiceSettings.from_env({"DIFFLENS_MAX_QUEUE_DEPTH": "many"})
    assert ServiceSettings.from_env({"DIFFLENS_REDIS_WAIT_S": "2.5"}).redis_wait_s == 2.5
    assert ServiceSettings.from_env({"DIFFLENS_RESULT_TTL_S": "3600"}).result_ttl_s == 3600.0
    with pytest.raises(InvalidArgument, match="DIFFLENS_REDIS_WAIT_S"):
        ServiceSettings.from_env({"DIFFLENS_REDIS_WAIT_S": "soon"})
    for var, value in (("DIFFLENS_MAX_QUEUE_DEPTH", "0"), ("DIFFLENS_HEARTBEAT_INTERVAL_S", "0")):
        with pytest.raises(InvalidArgument) as e:
            ServiceSettings.from_env({var: value})
        assert e.value.field == var
    assert ServiceSettings.from_env({"DIFFLENS_METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"


def test_a_short_visibility_timeout_can_be_set_with_its_heartbeat_from_the_environment():
    from difflens.config import ServiceSettings

    with pytest.raises(InvalidArgument, match="heartbeat_interval_s"):  # 5 s default heartbeat vs 3 s timeout
        ServiceSettings.from_env({"DIFFLENS_VISIBILITY_TIMEOUT_S": "3"})
    s = ServiceSettings.from_env({"DIFFLENS_VISIBILITY_TIMEOUT_S": "3", "DIFFLENS_HEARTBEAT_INTERVAL_S": "1"})
    assert (s.visibility_timeout_s, s.heartbeat_interval_s) == (3.0, 1.0)
    with pytest.raises(InvalidArgument, match="DIFFLENS_HEARTBEAT_INTERVAL_S"):
        ServiceSettings.from_env({"DIFFLENS_HEARTBEAT_INTERVAL_S": "often"})


def test_limit_idle_spin_leaves_an_operator_choice_and_a_loaded_torch_alone(monkeypatch):
    for chosen in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(chosen)
        assert not limit_idle_spin(env) and env == chosen
    # this test process has torch loaded: libgomp already read its environment, so nothing is set
    assert "torch" in sys.modules
    env: dict[str, str] = {}
    assert not limit_idle_spin(env) and env == {}
    monkeypatch.delitem(sys.modules, "torch")
    assert limit_idle_spin(env) and env == {"GOMP_SPINCOUNT": WORKER_GOMP_SPINCOUNT}


def test_the_cli_loads_no_torch_so_the_worker_can_set_the_spin_first():
    # run_worker calls limit_idle_spin first; that only works if importing the CLI has not loaded torch yet.
    # In a fresh interpreter: import the CLI modules, set the spin, then load torch and see it in the environment.
    code = ("import os, sys\n"
            "from difflens.config import limit_idle_spin\n"
            "import difflens.cli, difflens.commands.worker\n"
            "assert 'torch' not in sys.modules, 'the CLI imported torch at import time'\n"
            "assert limit_idle_spin()\n"
            "import torch\n"
            "print(os.environ['GOMP_SPINCOUNT'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == WORKER_GOMP_SPINCOUNT


def test_the_triton_backend_needs_a_url_and_a_dtype_numpy_has():
    env = {"DIFFLENS_UNET_BACKEND": "triton", "DIFFLENS_TRITON_URL": "triton.ml.svc:8001",
           "DIFFLENS_TRITON_MODEL": "unet-default, sd15=sd15-trt", "DIFFLENS_TRITON_WAIT_S": "120"}
    s = Settings.from_env(env)
    assert (s.unet_backend, s.triton_url, s.triton_wait_s) == ("triton", "triton.ml.svc:8001", 120.0)
    assert s.triton_model("sd15") == "sd15-trt" and s.triton_model("default") == "unet-default"
    assert Settings(unet_backend="triton", triton_url="[::1]:8001").triton_model("default") == "default"
    for overrides, field, says in (({"triton_url": None}, "triton_url", "needs the server's address"),
                                   ({"triton_url": "grpc://host:8001"}, "triton_url", "no scheme"),
                                   ({"dtype": "bfloat16"}, "dtype", "float32 or float16"),
                                   ({"triton_models": (("", "no spaces"),)}, "triton_models", "'no spaces'")):
        with pytest.raises(InvalidArgument) as e:
            Settings(**{"unet_backend": "triton", "triton_url": "127.0.0.1:8001", **overrides})
        assert e.value.field == field and says in e.value.message
    with pytest.raises(InvalidArgument) as e:  # from the environment: the variable is named
        Settings.from_env({**env, "DIFFLENS_TRITON_URL": "host"})
    assert e.value.field == "DIFFLENS_TRITON_URL" and "HOST:PORT" in e.value.message
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({**env, "DIFFLENS_TRITON_MODEL": "a=x,a=y"})
    assert e.value.field == "DIFFLENS_TRITON_MODEL" and "one Triton model per difflens model" in e.value.message
    # other backends leave the Triton variables unused (an exported DIFFLENS_TRITON_URL does not stop an eager run)
    assert Settings.from_env({**env, "DIFFLENS_UNET_BACKEND": "eager"}).unet_backend == "eager"


def test_the_triton_call_timeout_is_a_positive_finite_number_of_seconds():
    env = {"DIFFLENS_UNET_BACKEND": "triton", "DIFFLENS_TRITON_URL": "triton.ml.svc:8001"}
    assert Settings.from_env(env).triton_call_timeout_s == 120.0
    assert Settings.from_env({**env, "DIFFLENS_TRITON_CALL_TIMEOUT_S": "2.5"}).triton_call_timeout_s == 2.5
    for value, says in (("soon", "got 'soon'"), ("0", "must be > 0 and finite"), ("-1", "must be > 0 and finite"),
                        ("inf", "must be > 0 and finite"), ("nan", "must be > 0 and finite")):
        with pytest.raises(InvalidArgument) as e:  # from the environment: the variable is named
            Settings.from_env({**env, "DIFFLENS_TRITON_CALL_TIMEOUT_S": value})
        assert e.value.field == "DIFFLENS_TRITON_CALL_TIMEOUT_S" and says in e.value.message, value
    with pytest.raises(InvalidArgument) as e:
        Settings(triton_call_timeout_s=0.0)
    assert e.value.field == "triton_call_timeout_s"
