from sdcn_p2p.testing.fakecomfyui.fake import *  # noqa
from sdcn_p2p.testing.fakecomfyui.fake import OUT_OF_MEMORY, FakeComfyui, open_fake_comfyui  # noqa
