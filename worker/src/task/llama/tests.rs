//! The candle decoder against the PyTorch one: `golden.py` computed the loss and
//! every gradient's norm below with `paramserver.models.llama` at the same weights
//! and bytes (the integer formulas here and there).

use super::*;

// From golden.py.
const LOSS: f32 = 5.7153144;
const GRADIENT_NORMS: [(&str, f32); 21] = [
    ("embed_tokens.weight", 0.76825595),
    ("layers.0.input_layernorm.weight", 0.002142098),
    ("layers.0.self_attn.q_proj.weight", 0.0062655685),
    ("layers.0.self_attn.k_proj.weight", 0.005333351),
    ("layers.0.self_attn.v_proj.weight", 0.099112734),
    ("layers.0.self_attn.o_proj.weight", 0.28867704),
    ("layers.0.post_attention_layernorm.weight", 0.0013286667),
    ("layers.0.mlp.gate_proj.weight", 0.06427771),
    ("layers.0.mlp.up_proj.weight", 0.07649804),
    ("layers.0.mlp.down_proj.weight", 0.08748642),
    ("layers.1.input_layernorm.weight", 0.0017246848),
    ("layers.1.self_attn.q_proj.weight", 0.00359837),
    ("layers.1.self_attn.k_proj.weight", 0.0033304237),
    ("layers.1.self_attn.v_proj.weight", 0.10356834),
    ("layers.1.self_attn.o_proj.weight", 0.2923738),
    ("layers.1.post_attention_layernorm.weight", 0.001030626),
    ("layers.1.mlp.gate_proj.weight", 0.059488636),
    ("layers.1.mlp.up_proj.weight", 0.07597857),
    ("layers.1.mlp.down_proj.weight", 0.08705957),
    ("norm.weight", 0.047475647),
    ("lm_head.weight", 0.81635976),
];

const SHAPE: LlamaShape = LlamaShape { dim: 16, layers: 2, heads: 2, hidden: 24, context: 12 };

/// Matrices ((j·7919 + k·104729) mod 2001 − 1000) / 25000, norms 1 + ((j + k) mod 11 − 5) / 100,
/// for element j of the k-th tensor: the same numbers golden.py gives the PyTorch model.
fn formula_weights(shape: LlamaShape) -> Tensors {
    tensor_specs(shape, 0)
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let len = s.shape.iter().product::<u64>();
            let values = (0..len)
                .map(|j| {
                    if s.shape.len() >= 2 {
                        (((j * 7919 + k as u64 * 104_729) % 2001) as f64 - 1000.0) / 25_000.0
                    } else {
                        1.0 + (((j + k as u64) % 11) as f64 - 5.0) / 100.0
                    }
                })
                .map(|v| v as f32)
                .collect();
            (s.name.clone(), values)
        })
        .collect()
}

#[test]
fn loss_and_gradients_equal_the_pytorch_models() {
    let model = Llama::over(SHAPE, vec![b'x'; 400], 0, 1, Device::Cpu).unwrap();
    let vars = model.vars(&formula_weights(SHAPE)).unwrap();
    let tokens: Vec<u8> = (0..2 * 13).map(|i: u32| ((i * 37 + 11) % 256) as u8).collect();
    let loss = model.loss_of_tokens(&vars, &tokens, 2).unwrap();
    let value = loss.to_scalar::<f32>().unwrap();
    assert!((value - LOSS).abs() < 1e-5, "loss {value}, PyTorch's {LOSS}");
    let grads = model.gradients(&vars, &loss).unwrap();
    assert_eq!(grads.len(), GRADIENT_NORMS.len());
    for (name, expected) in GRADIENT_NORMS {
        let norm = grads[name].iter().map(|g| f64::from(*g).powi(2)).sum::<f64>().sqrt() as f32;
        assert!((norm - expected).abs() <= 1e-4 * expected.max(1e-2), "{name}: {norm} against PyTorch's {expected}");
    }
}

#[test]
fn the_sizes_have_the_pytorch_models_parameter_counts() {
    // llama.parameter_count("tiny" | "small" | "base") in the Python client.
    for (shape, count) in [(TINY, 869_504u64), (SMALL, 4_951_296), (BASE, 85_347_072)] {
        let total: u64 = tensor_specs(shape, 0).iter().map(|s| s.shape.iter().product::<u64>()).sum();
        assert_eq!(total, count, "{shape:?}");
    }
}

#[test]
fn a_training_step_on_the_shipped_text_reaches_every_tensor() {
    let model = Llama::new(SHAPE, 1, 2, Device::Cpu).unwrap();
    let (loss, grads) = model.loss_and_grads(&formula_weights(SHAPE), &[0, 777, 5000]).unwrap();
    assert!(loss.is_finite() && loss > 1.0, "loss {loss}");
    for (name, grad) in &grads {
        assert!(grad.iter().all(|g| g.is_finite()), "{name}");
        assert!(grad.iter().any(|g| *g != 0.0), "{name} got an all-zero gradient");
    }
    assert!(model.evaluate(&formula_weights(SHAPE)).unwrap().loss.is_finite());
}
