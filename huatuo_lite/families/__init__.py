"""Model families: what each provides (variants, prompt, image and generation facts,
its text architectures). A new family is one module here."""
