"""Guards between untrusted input and the machine: path containment, size caps, token redaction."""
