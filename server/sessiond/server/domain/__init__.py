"""Domain values and rules of sessiond. No I/O and no gRPC here."""
