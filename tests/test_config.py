from __future__ import annotations

import pytest

from difflens.config import Settings
from difflens.errors import InvalidArgument


def test_env_then_flags():
    s = Settings.from_env({"DIFFLENS_UNET_BACKEND": "compile", "DIFFLENS_DTYPE": "bfloat16"}, unet_backend=None)
    assert (s.unet_backend, s.dtype, s.device) == ("compile", "bfloat16", "cpu")
    assert Settings.from_env({"DIFFLENS_UNET_BACKEND": "compile"}, unet_backend="eager").unet_backend == "eager"


@pytest.mark.parametrize("key,value,field", [("DIFFLENS_UNET_BACKEND", "tensorrt", "unet_backend"),
                                             ("DIFFLENS_DTYPE", "int8", "dtype"),
                                             ("DIFFLENS_DEVICE", "tpu", "device")])
def test_bad_values_name_the_field(key, value, field):
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({key: value})
    assert e.value.field == field and value in e.value.message
