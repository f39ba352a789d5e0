"""SiD / SiDA / SiD²A distillation core: plain torch, no Ray, no storage policy."""
