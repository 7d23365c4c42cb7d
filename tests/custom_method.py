"""A distillation method defined outside logitcache, in a module of its own: registering it is all it takes."""

from pydantic import Field

from logitcache.student.methods import Method, MethodConfig, Needs, register


class LogitMatchConfig(MethodConfig):
    scale: float = Field(1.0, gt=0, description="multiplies both logits before the squared difference")


@register
class LogitMatch(Method):
    name = "logit_match"
    family = "response"
    description = "mean squared difference of student and teacher logits (Ba & Caruana 2014)"
    Config = LogitMatchConfig

    @classmethod
    def needs(cls, cfg):
        return Needs(logits=True)

    def forward(self, student, teacher, batch, at):
        loss = ((self.cfg.scale * (student.logits - teacher.logits[0])) ** 2).mean()
        return loss, {"mse": loss.detach()}
