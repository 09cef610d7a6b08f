//! `op-loop`: a benchmark program. The request is a decimal count N; the
//! program launches N tiny `add` ops on the accelerator and emits the final
//! value, so the host-call overhead per launch can be measured.
use cinfer_guest::accel::Tensor;
use cinfer_guest::{Error, Program, output, request};

struct OpLoop;

impl Program for OpLoop {
    fn run() -> Result<(), Error> {
        let body = request::open()?;
        let n: u32 = core::str::from_utf8(&body)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(Error::BadRequest)?;
        let one = Tensor::from_f32(&[1], &[1.0])?;
        let mut acc = Tensor::zeros(&[1])?;
        for _ in 0..n {
            acc = acc.add(&one)?;
        }
        output::emit_str(&format!("{}", acc.to_vec()?[0]));
        Ok(())
    }
}

cinfer_guest::program!(OpLoop);
