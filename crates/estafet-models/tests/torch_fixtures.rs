//! The classic cells against PyTorch's `nn.RNN`, `nn.LSTM` and `nn.GRU`: outputs, final states
//! and gradients on golden values written by `fixtures/make_torch_fixtures.py`.

#![allow(deprecated)] // Device::ndarray: the reference CPU backend for these tests

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use estafet_models::gru::Gru;
use estafet_models::lstm::{Lstm, LstmState};
use estafet_models::rnn::{Nonlinearity, Rnn};
use serde_json::Value;

const FIXTURES: &str = include_str!("fixtures/torch_cells.json");

fn device() -> Device {
    Device::ndarray().autodiff()
}

fn case(name: &str) -> Value {
    let all: Value = serde_json::from_str(FIXTURES).unwrap();
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("fixture {name}"))
        .clone()
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number: {other}"),
    }
}

fn shape(v: &Value) -> Vec<usize> {
    match v {
        Value::Array(items) => {
            let mut s = vec![items.len()];
            s.extend(shape(&items[0]));
            s
        }
        _ => vec![],
    }
}

fn tensor<const D: usize>(v: &Value) -> Tensor<D> {
    let shape: [usize; D] = shape(v).try_into().unwrap();
    Tensor::from_data(TensorData::new(flat(v), shape), &device())
}

/// PyTorch's `weight [G·H, in]` and `bias [G·H]` as a `Linear [in, G·H]`.
fn linear(c: &Value, weight: &str, bias: &str) -> Linear {
    Linear {
        weight: Param::from_tensor(tensor::<2>(&c["params"][weight]).transpose()),
        bias: Some(Param::from_tensor(tensor::<1>(&c["params"][bias]))),
    }
}

fn input_linear(c: &Value, l: usize) -> Linear {
    linear(c, &format!("weight_ih_l{l}"), &format!("bias_ih_l{l}"))
}

fn hidden_linear(c: &Value, l: usize) -> Linear {
    linear(c, &format!("weight_hh_l{l}"), &format!("bias_hh_l{l}"))
}

/// `[layers, B, H]` → the state of layer `l`, `[B, H]`.
fn layer_state(v: &Value, l: usize) -> Tensor<2> {
    tensor::<2>(&v[l])
}

fn close<const D: usize>(actual: Tensor<D>, expected: &Value, what: &str) {
    let expected = tensor::<D>(expected);
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e): (Vec<f32>, Vec<f32>) = (
        actual.to_data().to_vec().unwrap(),
        expected.to_data().to_vec().unwrap(),
    );
    let worst = a
        .iter()
        .zip(&e)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "{what}: max |Δ| = {worst}");
}

/// Gradient of a PyTorch-layout weight: ours is `[in, G·H]`, PyTorch's `[G·H, in]`.
fn close_weight_grad(linear: &Linear, grads: &burn::tensor::Gradients, c: &Value, name: &str) {
    close(
        linear.weight.grad(grads).unwrap().transpose(),
        &c["grad_params"][name],
        name,
    );
}

fn close_bias_grad(linear: &Linear, grads: &burn::tensor::Gradients, c: &Value, name: &str) {
    close(
        linear.bias.as_ref().unwrap().grad(grads).unwrap(),
        &c["grad_params"][name],
        name,
    );
}

fn check_linear_grads(
    input: &Linear,
    hidden: &Linear,
    grads: &burn::tensor::Gradients,
    c: &Value,
    l: usize,
) {
    close_weight_grad(input, grads, c, &format!("weight_ih_l{l}"));
    close_weight_grad(hidden, grads, c, &format!("weight_hh_l{l}"));
    close_bias_grad(input, grads, c, &format!("bias_ih_l{l}"));
    close_bias_grad(hidden, grads, c, &format!("bias_hh_l{l}"));
}

#[test]
fn rnn_matches_torch() {
    for (name, nonlinearity) in [
        ("rnn_tanh", Nonlinearity::Tanh),
        ("rnn_relu", Nonlinearity::Relu),
    ] {
        let c = case(name);
        let rnn = Rnn {
            input: input_linear(&c, 0),
            hidden: hidden_linear(&c, 0),
            nonlinearity,
        };
        let x = tensor::<3>(&c["x"]).require_grad();
        let (y, h) = rnn.forward(x.clone(), Some(layer_state(&c["h0"], 0)));
        close(y.clone(), &c["y"], &format!("{name} y"));
        close(h.clone(), &c["hn"][0], &format!("{name} h_T"));
        let loss = (y * tensor::<3>(&c["r"])).sum() + h.sum();
        let grads = loss.backward();
        close(x.grad(&grads).unwrap(), &c["grad_x"], &format!("{name} dx"));
        check_linear_grads(&rnn.input, &rnn.hidden, &grads, &c, 0);
    }
}

#[test]
fn gru_matches_torch() {
    let c = case("gru");
    let gru = Gru {
        input: input_linear(&c, 0),
        hidden: hidden_linear(&c, 0),
    };
    let x = tensor::<3>(&c["x"]).require_grad();
    let (y, h) = gru.forward(x.clone(), Some(layer_state(&c["h0"], 0)));
    close(y.clone(), &c["y"], "gru y");
    close(h.clone(), &c["hn"][0], "gru h_T");
    let grads = ((y * tensor::<3>(&c["r"])).sum() + h.sum()).backward();
    close(x.grad(&grads).unwrap(), &c["grad_x"], "gru dx");
    check_linear_grads(&gru.input, &gru.hidden, &grads, &c, 0);
}

#[test]
fn lstm_matches_torch() {
    let c = case("lstm");
    let lstm = Lstm {
        input: input_linear(&c, 0),
        hidden: hidden_linear(&c, 0),
    };
    let x = tensor::<3>(&c["x"]).require_grad();
    let state = LstmState {
        h: layer_state(&c["h0"], 0),
        c: layer_state(&c["c0"], 0),
    };
    let (y, last) = lstm.forward(x.clone(), Some(state));
    close(y.clone(), &c["y"], "lstm y");
    close(last.h.clone(), &c["hn"][0], "lstm h_T");
    close(last.c.clone(), &c["cn"][0], "lstm c_T");
    let grads = ((y * tensor::<3>(&c["r"])).sum() + last.h.sum() + last.c.sum()).backward();
    close(x.grad(&grads).unwrap(), &c["grad_x"], "lstm dx");
    check_linear_grads(&lstm.input, &lstm.hidden, &grads, &c, 0);
}

/// PyTorch's `num_layers = 2` is two cells chained, which is estafet's `stacked` layout.
#[test]
fn two_layer_lstm_and_gru_match_torch() {
    let c = case("lstm_2layer");
    let layers: Vec<Lstm> = (0..2)
        .map(|l| Lstm {
            input: input_linear(&c, l),
            hidden: hidden_linear(&c, l),
        })
        .collect();
    let x = tensor::<3>(&c["x"]).require_grad();
    let (mut y, mut finals) = (x.clone(), Vec::new());
    for (l, lstm) in layers.iter().enumerate() {
        let state = LstmState {
            h: layer_state(&c["h0"], l),
            c: layer_state(&c["c0"], l),
        };
        let (out, last) = lstm.forward(y, Some(state));
        close(last.h.clone(), &c["hn"][l], &format!("lstm layer {l} h_T"));
        close(last.c.clone(), &c["cn"][l], &format!("lstm layer {l} c_T"));
        y = out;
        finals.push(last);
    }
    close(y.clone(), &c["y"], "lstm_2layer y");
    let mut loss = (y * tensor::<3>(&c["r"])).sum();
    for s in finals {
        loss = loss + s.h.sum() + s.c.sum();
    }
    let grads = loss.backward();
    close(x.grad(&grads).unwrap(), &c["grad_x"], "lstm_2layer dx");
    for (l, lstm) in layers.iter().enumerate() {
        check_linear_grads(&lstm.input, &lstm.hidden, &grads, &c, l);
    }

    let c = case("gru_2layer");
    let layers: Vec<Gru> = (0..2)
        .map(|l| Gru {
            input: input_linear(&c, l),
            hidden: hidden_linear(&c, l),
        })
        .collect();
    let x = tensor::<3>(&c["x"]).require_grad();
    let (mut y, mut loss_h) = (x.clone(), Vec::new());
    for (l, gru) in layers.iter().enumerate() {
        let (out, h) = gru.forward(y, Some(layer_state(&c["h0"], l)));
        close(h.clone(), &c["hn"][l], &format!("gru layer {l} h_T"));
        y = out;
        loss_h.push(h);
    }
    close(y.clone(), &c["y"], "gru_2layer y");
    let mut loss = (y * tensor::<3>(&c["r"])).sum();
    for h in loss_h {
        loss = loss + h.sum();
    }
    let grads = loss.backward();
    close(x.grad(&grads).unwrap(), &c["grad_x"], "gru_2layer dx");
    for (l, gru) in layers.iter().enumerate() {
        check_linear_grads(&gru.input, &gru.hidden, &grads, &c, l);
    }
}
