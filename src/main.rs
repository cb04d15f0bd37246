pub mod pb { tonic::include_proto!("kabar.v1"); }
fn main() {}
