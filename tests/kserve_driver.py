"""Drives a zspace server's KServe v2 endpoint with the real `tritonclient[grpc]`, in a process of its own.

    python tests/kserve_driver.py TARGET SCENARIO OUT_DIR [TOKEN]

Its own process, because tritonclient's generated code and zspace's define the same
protobuf names (package `inference`) and one process's default descriptor pool holds
each name once. Answers go to OUT_DIR: arrays as .npy, the rest as result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def failure(call) -> dict:
    """Run `call`; {"status": "OK"} or the status code name and message it failed with."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()).removeprefix("StatusCode."), "message": exc.message()}
    return {"status": "OK"}


def infer(client, model: str, name: str, x: np.ndarray, datatype: str, outputs=None, headers=None):
    given = triton.InferInput(name, list(x.shape), datatype)
    given.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, [given], outputs=wanted, headers=headers)


def basic(client, target: str, out: Path) -> dict:
    x = np.load(out / "x.npy")
    meta = client.get_model_metadata("digits.encoder", as_json=True)
    dec_meta = client.get_model_metadata("digits.decoder", as_json=True)
    config = client.get_model_config("digits.encoder", as_json=True)["config"]
    enc_in, enc_outs = meta["inputs"][0]["name"], [o["name"] for o in meta["outputs"]]
    r = infer(client, "digits.encoder", enc_in, x, "FP32")
    np.save(out / "mean.npy", r.as_numpy(enc_outs[0]))
    np.save(out / "logvar.npy", r.as_numpy(enc_outs[1]))
    np.save(out / "mean_u8.npy", infer(client, "digits.encoder", enc_in, np.load(out / "x_u8.npy"), "UINT8").as_numpy(enc_outs[0]))
    np.save(out / "mean_f16.npy", infer(client, "digits.encoder", enc_in, x.astype(np.float16), "FP16").as_numpy(enc_outs[0]))
    only = infer(client, "digits.encoder", enc_in, x, "FP32", outputs=[enc_outs[1]])
    z = np.load(out / "z.npy")
    dec = infer(client, "digits.decoder", dec_meta["inputs"][0]["name"], z, "FP32")
    np.save(out / "x_hat.npy", dec.as_numpy(dec_meta["outputs"][0]["name"]))
    # Typed contents (tritonclient itself always sends raw bytes): the protocol's own stub.
    import grpc

    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name=enc_in, datatype="FP32", shape=list(x.shape))
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        typed = stub.ModelInfer(service_pb2.ModelInferRequest(model_name="digits.encoder", inputs=[tensor], id="t1"))
        np.save(out / "mean_typed.npy", np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(len(x), -1))
    return {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits.encoder"), "decoder_ready": client.is_model_ready("digits.decoder"),
        "version_1_ready": client.is_model_ready("digits.encoder", "1"), "unknown_ready": client.is_model_ready("nope.encoder"),
        "server": client.get_server_metadata(as_json=True), "metadata": meta, "decoder_metadata": dec_meta,
        "config": config, "only_outputs": [o.name for o in only.get_response().outputs], "typed_id": typed.id,
        "typed_version": typed.model_version,
    }


def bad(client, target: str, out: Path) -> dict:
    import grpc

    x = np.load(out / "x.npy")
    name = client.get_model_metadata("digits.encoder", as_json=True)["inputs"][0]["name"]
    big = np.zeros((int((out / "max_rows").read_text()) + 1, x.shape[1]), np.float32)
    cases = {
        "unknown_model": lambda: infer(client, "nope.encoder", name, x, "FP32"),
        "unknown_graph": lambda: infer(client, "digits.middle", name, x, "FP32"),
        "unknown_version": lambda: client.infer("digits.encoder", [_input(name, x, "FP32")], model_version="99"),
        "bad_version": lambda: client.infer("digits.encoder", [_input(name, x, "FP32")], model_version="one"),
        "wrong_datatype": lambda: infer(client, "digits.encoder", name, x.astype(np.int32), "INT32"),
        "uint8_latents": lambda: infer(client, "digits.decoder", "z", np.zeros((2, 4), np.uint8), "UINT8"),
        "wrong_shape": lambda: infer(client, "digits.encoder", name, x[:, :10].copy(), "FP32"),
        "wrong_input_name": lambda: infer(client, "digits.encoder", "pixels", x, "FP32"),
        "oversized_batch": lambda: infer(client, "digits.encoder", name, big, "FP32"),
        "unknown_output": lambda: infer(client, "digits.encoder", name, x, "FP32", outputs=["nope"]),
        "nan": lambda: infer(client, "digits.encoder", name, np.full_like(x, np.nan), "FP32"),
        "metadata_unknown": lambda: client.get_model_metadata("nope.encoder"),
    }
    found = {k: failure(call) for k, call in cases.items()}
    # A byte length that does not match the shape: tritonclient would not send one, the raw stub can.
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=list(x.shape))
        request = service_pb2.ModelInferRequest(model_name="digits.encoder", inputs=[tensor],
                                                raw_input_contents=[x.tobytes()[:-4]])
        try:
            stub.ModelInfer(request)
            found["byte_length"] = {"status": "OK"}
        except grpc.RpcError as exc:
            found["byte_length"] = {"status": exc.code().name, "message": exc.details()}
    return found


def auth(client, target: str, out: Path, token: str) -> dict:
    x = np.load(out / "x.npy")
    name = "x"
    return {"live": client.is_server_live(), "ready": client.is_server_ready(),
            "no_token": failure(lambda: infer(client, "digits.encoder", name, x, "FP32")),
            "token": failure(lambda: infer(client, "digits.encoder", name, x, "FP32",
                                           headers={"authorization": f"Bearer {token}"}))}


def shared_memory(client, target: str, out: Path, prefix: str, token: str = "") -> dict:
    """tritonclient.utils.shared_memory against the server: register, infer through regions, and each misuse."""
    import tritonclient.utils.shared_memory as shm

    headers = {"authorization": f"Bearer {token}"} if token else None
    x = np.load(out / "x.npy")
    rows, out_bytes = len(x), len(x) * 4 * 4  # mean [rows, 4] float32
    regions = {"in": shm.create_shared_memory_region(f"{prefix}in", f"/{prefix}in", x.nbytes),
               "out": shm.create_shared_memory_region(f"{prefix}out", f"/{prefix}out", out_bytes + 64)}
    shm.set_shared_memory_region(regions["in"], [x])
    result = {"extensions": list(client.get_server_metadata(headers=headers).extensions)}
    if token:
        result["register_without_token"] = failure(
            lambda: client.register_system_shared_memory(f"{prefix}in", f"/{prefix}in", x.nbytes))
    register = lambda name, key, size, offset=0: failure(
        lambda: client.register_system_shared_memory(name, key, size, offset=offset, headers=headers))
    result["register_in"] = register(f"{prefix}in", f"/{prefix}in", x.nbytes)
    result["register_out"] = register(f"{prefix}out", f"/{prefix}out", out_bytes + 64)
    result["status"] = sorted(client.get_system_shared_memory_status(headers=headers, as_json=True)
                              .get("regions", {}))

    def through_shm(in_offset=0, in_size=x.nbytes, out_size=out_bytes, out_region=f"{prefix}out", in_region=f"{prefix}in"):
        given = triton.InferInput("x", list(x.shape), "FP32")
        given.set_shared_memory(in_region, in_size, offset=in_offset)
        wanted = triton.InferRequestedOutput("mean")
        wanted.set_shared_memory(out_region, out_size, offset=64)
        wanted_logvar = triton.InferRequestedOutput("logvar")  # in the message, beside one in shared memory
        return client.infer("digits.encoder", [given], outputs=[wanted, wanted_logvar], headers=headers)

    answer = through_shm()
    told = next(o for o in answer.get_response().outputs if o.name == "mean")  # where it is, and no contents
    result["mean_told"] = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in told.parameters.items()}
    result["contents"] = len(answer.get_response().raw_output_contents)
    np.save(out / "logvar_shm.npy", answer.as_numpy("logvar"))
    full = np.frombuffer(shm.get_contents_as_numpy(regions["out"], np.uint8, [out_bytes + 64]).tobytes()[64:], np.float32)
    np.save(out / "mean_shm.npy", full.reshape(rows, 4))
    result["same_name_again"] = register(f"{prefix}in", f"/{prefix}out", 8)
    result["no_segment"] = register(f"{prefix}x", f"/{prefix}nonexistent", 8)
    result["path_as_key"] = register(f"{prefix}x", "/../../etc/passwd", 8)
    result["past_segment"] = register(f"{prefix}x", f"/{prefix}in", x.nbytes + 1)
    result["input_outside_region"] = failure(lambda: through_shm(in_offset=4))
    result["input_wrong_size"] = failure(lambda: through_shm(in_size=x.nbytes - 4))
    result["output_too_small"] = failure(lambda: through_shm(out_size=out_bytes - 4))
    result["unknown_region"] = failure(lambda: through_shm(in_region=f"{prefix}nope"))
    result["unregister_unknown"] = failure(lambda: client.unregister_system_shared_memory(f"{prefix}nope", headers=headers))
    result["cuda_register"] = failure(lambda: client.register_cuda_shared_memory(f"{prefix}cu", b"\0" * 64, 0, 8,
                                                                                 headers=headers))
    # The client removes its input segment while it is registered: the next use says so and drops the region.
    shm.destroy_shared_memory_region(regions["in"])
    result["vanished"] = failure(lambda: through_shm())
    result["status_after_vanished"] = sorted(client.get_system_shared_memory_status(headers=headers, as_json=True)
                                             .get("regions", {}))
    result["unregister_all"] = failure(lambda: client.unregister_system_shared_memory(headers=headers))
    result["status_after_all"] = sorted(client.get_system_shared_memory_status(headers=headers, as_json=True)
                                        .get("regions", {}))
    shm.destroy_shared_memory_region(regions["out"])
    return result


def _input(name: str, x: np.ndarray, datatype: str):
    given = triton.InferInput(name, list(x.shape), datatype)
    given.set_data_from_numpy(x)
    return given


def main() -> None:
    target, scenario, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    client = triton.InferenceServerClient(target)
    extra = sys.argv[4:]
    result = {"basic": basic, "bad": bad, "auth": auth, "shared_memory": shared_memory}[scenario](client, target, out, *extra)
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
