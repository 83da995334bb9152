"""StableHLO -> LiteRT flatbuffer: `PYTHON litert_convert.py PROGRAM.stablehlo OUT.tflite INPUT_NAME OUTPUT_NAME`.

Run by the converter's own interpreter (`make litert-venv` makes .venv-litert with litert-converter,
whose xdsl pins typing-extensions below the project's), so it imports nothing from jaxclf and needs no
JAX: PROGRAM is the portable StableHLO artefact of `jax.export` (`Exported.mlir_module_serialized`).
litert-converter is the StableHLO -> TFLite lowering that litert-torch uses, without TensorFlow.
"""

import sys


def convert(program: bytes, input_name: str, output_name: str) -> bytes:
    """The LiteRT flatbuffer of a one-input, one-output StableHLO program, with a serving_default signature."""
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir._mlir_libs import converter_api_ext as converter
    from litert_converter.mlir.dialects import stablehlo

    context = ir.Context()
    converter.prepare_mlir_context(context)
    with context:
        module = stablehlo.deserialize_portable_artifact(context, program)
        converter.set_signature(module.operation, signature_name="serving_default",
                                input_names=[input_name], output_names=[output_name])
        config = converter.ConvertToTFLConfig()
        config.model_origin_framework = "JAX"
        converter.run_convert_to_tfl_passes(module, passmanager.PassManager(), config)
        return converter.export_flatbuffer_to_bytes(module.operation)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    program_path, out_path, input_name, output_name = argv
    with open(program_path, "rb") as f:
        program = f.read()
    flatbuffer = convert(program, input_name, output_name)
    with open(out_path, "wb") as f:
        f.write(flatbuffer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
