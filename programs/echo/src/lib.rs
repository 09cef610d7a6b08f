//! `echo`: opens the sealed request and emits it back, sealed. The smallest
//! program that exercises the whole decrypt → compute → encrypt path.
use cinfer_guest::{Error, Program, output, request};

struct Echo;

impl Program for Echo {
    fn run() -> Result<(), Error> {
        let body = request::open()?;
        output::emit(&body);
        Ok(())
    }
}

cinfer_guest::program!(Echo);
