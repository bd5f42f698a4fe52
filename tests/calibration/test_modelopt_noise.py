"""ModelOpt's GPU-count probe error is dropped on CPU calibration; every other ModelOpt error still shows."""
import logging

from mplus_deploy.calibration.steps import _no_gpu_probe_noise


def test_only_the_nvml_probe_line_is_dropped(caplog):
    log = logging.getLogger("modelopt.onnx")
    with caplog.at_level(logging.ERROR):
        with _no_gpu_probe_noise():
            log.error("Failed to get GPU count: NVML Shared Library Not Found")
            log.error("Failed to quantize node /layers.0/q_proj/base_layer/MatMul")
        log.error("Failed to get GPU count: NVML Shared Library Not Found")  # outside: the filter is gone
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["Failed to quantize node /layers.0/q_proj/base_layer/MatMul",
                    "Failed to get GPU count: NVML Shared Library Not Found"]
